"""Training examples for the bi-encoder: each train query with one positive and K hard negatives.

Sampling is a pure function of (seed, epoch, qid), so a resumed run rebuilds exactly the same batches.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from irbase.formats import Qrels


@dataclass
class NegativesConfig:
    files: list[str] = field(default_factory=list)  # mined (qid pid rank score) or official (qid pid) files
    per_query: int = 1          # K hard negatives per query
    depth: int = 30             # sample from each file's top-`depth` for a query
    skip_top: int = 0           # skip the top mined ranks (likely unjudged positives)


def _rng(seed: int, epoch: int, key: str) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}:{epoch}:{key}".encode()))


@dataclass
class TrainExamples:
    queries: dict[str, str]
    positives: dict[str, list[str]]     # qid -> relevant pids
    negatives: dict[str, list[str]]     # qid -> candidate hard negatives (positives already removed)
    passages: dict[str, str]
    per_query: int = 1
    seed: int = 13

    @classmethod
    def build(cls, queries: dict[str, str], qrels: Qrels, passages: dict[str, str],
              negative_lists: Sequence[dict[str, list[str]]], config: NegativesConfig, seed: int,
              max_queries: int | None = None) -> "TrainExamples":
        positives = {qid: sorted(p for p, rel in judged.items() if rel > 0 and p in passages)
                     for qid, judged in qrels.items() if qid in queries}
        positives = {qid: pids for qid, pids in positives.items() if pids}
        qids = sorted(positives)
        if max_queries is not None:
            qids = sorted(random.Random(seed).sample(qids, min(max_queries, len(qids))))
        negatives: dict[str, list[str]] = {}
        for qid in qids:
            pool: list[str] = []
            for lists in negative_lists:
                pool.extend(lists.get(qid, [])[config.skip_top: config.depth])
            excluded = set(positives[qid])
            negatives[qid] = [p for p in dict.fromkeys(pool) if p not in excluded and p in passages]
        return cls({q: queries[q] for q in qids}, {q: positives[q] for q in qids}, negatives, passages,
                   config.per_query, seed)

    def __len__(self) -> int:
        return len(self.queries)

    def sample(self, qid: str, epoch: int, all_pids: list[str]) -> tuple[str, list[str]]:
        """One positive and `per_query` negatives; random passages fill in when mined ones run short."""
        rng = _rng(self.seed, epoch, qid)
        positive = rng.choice(self.positives[qid])
        pool = self.negatives.get(qid, [])
        chosen = rng.sample(pool, min(self.per_query, len(pool)))
        excluded = set(self.positives[qid]) | set(chosen)
        while len(chosen) < self.per_query:
            pid = rng.choice(all_pids)
            if pid not in excluded:
                chosen.append(pid)
                excluded.add(pid)
        return positive, chosen


class TrainBatches:
    """The `BatchSource` the shared trainer consumes: shuffled per epoch, sharded over ranks."""

    def __init__(self, examples: TrainExamples, batch_size: int,
                 tokenize: Callable[[Sequence[str], str], dict[str, torch.Tensor]]):
        self.examples, self.batch_size, self.tokenize = examples, batch_size, tokenize
        self.qids = sorted(examples.queries)
        self.all_pids = sorted(examples.passages)

    def micro_batches_per_epoch(self, world_size: int) -> int:
        return len(self.qids) // (self.batch_size * world_size)

    def epoch_order(self, epoch: int) -> list[str]:
        order = list(self.qids)
        random.Random(self.examples.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def batches(self, epoch: int, skip: int, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        order = self.epoch_order(epoch)
        per_rank = self.micro_batches_per_epoch(world_size)
        for index in range(skip, per_rank):
            global_index = index * world_size + rank
            qids = order[global_index * self.batch_size:(global_index + 1) * self.batch_size]
            yield self.collate(qids, epoch)

    def collate(self, qids: list[str], epoch: int) -> dict[str, Any]:
        ex = self.examples
        positives, negatives = [], []
        for qid in qids:
            pos, negs = ex.sample(qid, epoch, self.all_pids)
            positives.append(pos)
            negatives.extend(negs)
        pids = positives + negatives  # passage j < B is query j's positive
        false_negatives = torch.zeros(len(qids), len(pids), dtype=torch.bool)
        for i, qid in enumerate(qids):
            relevant = set(ex.positives[qid])
            for j, pid in enumerate(pids):
                if j != i and pid in relevant:
                    false_negatives[i, j] = True
        q = self.tokenize([ex.queries[qid] for qid in qids], "query")
        p = self.tokenize([ex.passages[pid] for pid in pids], "passage")
        return {"query_input_ids": q["input_ids"], "query_attention_mask": q["attention_mask"],
                "passage_input_ids": p["input_ids"], "passage_attention_mask": p["attention_mask"],
                "labels": torch.arange(len(qids)), "false_negatives": false_negatives,
                "num_examples": len(qids)}
