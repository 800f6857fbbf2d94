"""Passage -> query examples for the generator: a fixed held-out slice of the train queries, the prompt
layout training and generation share, and batches whose loss falls on the query tokens only."""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from irbase.examples import EpochOrder
from irbase.formats import Qrels


@dataclass
class HoldoutConfig:
    queries: int = 1000     # train queries set aside to choose generator settings and filters (never dev)
    seed: int = 2024        # fixed apart from run.seed, so every recipe holds out the same queries


def split_holdout(qrels: Qrels, queries: dict[str, str], passages: dict[str, str],
                  config: HoldoutConfig) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train, held_out): qid -> positive pids that exist in the collection, split by a fixed seed."""
    positives = {qid: sorted(p for p, rel in judged.items() if rel > 0 and p in passages)
                 for qid, judged in qrels.items() if qid in queries}
    qids = sorted(q for q, pids in positives.items() if pids)
    held = set(random.Random(config.seed).sample(qids, min(config.queries, len(qids) // 2)))
    return ({q: positives[q] for q in qids if q not in held}, {q: positives[q] for q in qids if q in held})


class PromptEncoder:
    """Token ids of `prompt` around a passage cut to `passage_max_tokens`, and of a target query + EOS."""

    def __init__(self, tokenizer, prompt: str, passage_max_tokens: int, query_max_tokens: int):
        self.tokenizer = tokenizer
        before, after = prompt.split("{passage}", 1)
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.before = self._ids(before)
        self.after = self._ids(after)
        self.passage_max_tokens, self.query_max_tokens = passage_max_tokens, query_max_tokens
        if tokenizer.eos_token_id is None:
            raise ValueError("the generator's tokenizer has no EOS token to end a query with")
        self.eos = tokenizer.eos_token_id

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def prompts(self, passages: Sequence[str]) -> list[list[int]]:
        cut = self.tokenizer(list(passages), add_special_tokens=False, truncation=True,
                             max_length=self.passage_max_tokens)["input_ids"]
        return [self.bos + self.before + ids + self.after for ids in cut]

    def targets(self, queries: Sequence[str]) -> list[list[int]]:
        ids = self.tokenizer([" " + q.strip() for q in queries], add_special_tokens=False)["input_ids"]
        return [row[: self.query_max_tokens - 1] + [self.eos] for row in ids]


def collate(prompts: list[list[int]], targets: list[list[int]], vocab_map: np.ndarray,
            pad_id: int) -> dict[str, Any]:
    """Right-padded prompt + target; `targets[b, t]` is the sliced id position t predicts (query tokens
    only, -100 elsewhere and for tokens outside the sliced vocabulary)."""
    width = max(len(p) + len(t) for p, t in zip(prompts, targets))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    out = torch.full((len(prompts), width), -100, dtype=torch.long)
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        seq = prompt + target
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        sliced = vocab_map[np.asarray(target)]
        out[row, len(prompt) - 1: len(seq) - 1] = torch.from_numpy(np.where(sliced < 0, -100, sliced))
    return {"input_ids": input_ids, "attention_mask": mask, "targets": out, "num_examples": len(prompts)}


class GeneratorBatches:
    """A `BatchSource`: shuffled train queries per epoch, each with one of its positives (a pure function
    of seed, epoch and qid, so a resumed run sees the same batches)."""

    def __init__(self, positives: dict[str, list[str]], queries: dict[str, str], passages: dict[str, str],
                 encoder: PromptEncoder, vocab_map: np.ndarray, batch_size: int, seed: int):
        self.positives, self.queries, self.passages = positives, queries, passages
        self.encoder, self.vocab_map, self.seed = encoder, vocab_map, seed
        self.order = EpochOrder(list(positives), batch_size, seed)
        pad = encoder.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else encoder.eos

    def micro_batches_per_epoch(self, world_size: int) -> int:
        return self.order.micro_batches_per_epoch(world_size)

    def pair(self, qid: str, epoch: int) -> tuple[str, str]:
        rng = random.Random(zlib.crc32(f"{self.seed}:{epoch}:{qid}".encode()))
        return self.passages[rng.choice(self.positives[qid])], self.queries[qid]

    def batch(self, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
        return collate(self.encoder.prompts([p for p, _ in pairs]), self.encoder.targets([q for _, q in pairs]),
                       self.vocab_map, self.pad_id)

    def batches(self, epoch: int, skip: int, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        for qids in self.order.batches(epoch, skip, rank, world_size):
            yield self.batch([self.pair(qid, epoch) for qid in qids])


def vocab_ids(tokenizer, texts: Sequence[str], encoder: PromptEncoder, batch: int = 2048) -> list[int]:
    """Every base-tokenizer id that the prompt, EOS, the queries (as targets) and `texts` produce."""
    seen = set(encoder.bos + encoder.before + encoder.after + [encoder.eos])
    for start in range(0, len(texts), batch):
        for row in tokenizer([" " + t for t in texts[start:start + batch]], add_special_tokens=False)["input_ids"]:
            seen.update(row)
    return sorted(seen)


def vocab_map(vocab: Sequence[int], size: int) -> np.ndarray:
    """base id -> sliced id (-1 outside the sliced vocabulary)."""
    mapping = np.full(size, -1, dtype=np.int64)
    mapping[np.asarray(vocab, dtype=np.int64)] = np.arange(len(vocab))
    return mapping
