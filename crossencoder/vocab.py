"""Shrinking the 262k-token Gemma vocabulary to the tokens a corpus and its queries produce.

The embedding matrix is most of a cut-down Gemma (262k x 640 floats = 671 MB of a 4-layer model's
~750 MB); the kept rows are usually a few percent. Tokens outside the kept set are spelled out in
byte-fallback tokens (all kept) by `PairEncoder`, so unseen words degrade gracefully instead of
becoming <unk>.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from irbase import formats

from crossencoder.pairs import PairEncoder

BYTE_TOKEN = re.compile(r"^<0x[0-9A-F]{2}>$")


@dataclass
class VocabShrink:
    kept: np.ndarray                  # sorted tokenizer ids kept; the new id of kept[i] is i
    original: int                     # tokenizer vocabulary size
    stats: dict = field(default_factory=dict)

    @property
    def vocab_map(self) -> np.ndarray:
        mapping = np.full(self.original, -1, dtype=np.int64)
        mapping[self.kept] = np.arange(len(self.kept))
        return mapping

    @classmethod
    def from_texts(cls, pairs: PairEncoder, texts: Iterable[tuple[str, str]], batch: int = 4096) -> "VocabShrink":
        """`texts` yields (kind, text), kind 'query' or 'passage', tokenized exactly as pairs are."""
        tokenizer = pairs.tokenizer
        original = tokenizer.get_vocab_size(with_added_tokens=True)
        seen = np.zeros(original, dtype=bool)
        fmt = pairs.format
        seen[list(fmt.special_ids() | set(pairs.token_ids([fmt.query_prefix, fmt.passage_prefix])[0]))] = True
        for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
            if BYTE_TOKEN.match(token):
                seen[token_id] = True
        counts = {"query": 0, "passage": 0}
        chunk: list[str] = []
        for kind, text in tqdm(texts, desc="vocabulary", unit="text"):
            counts[kind] += 1
            chunk.append((fmt.query_prefix if kind == "query" else fmt.passage_prefix) + text)
            if len(chunk) >= batch:
                _mark(seen, pairs, chunk)
                chunk = []
        _mark(seen, pairs, chunk)
        kept = np.flatnonzero(seen)
        return cls(kept, original, {"kept": int(len(kept)), "original": original, **counts})

    def save(self, path: Path) -> None:
        np.save(path, self.vocab_map)


def _mark(seen: np.ndarray, pairs: PairEncoder, texts: list[str]) -> None:
    if texts:
        for encoding in pairs.tokenizer.encode_batch(texts, add_special_tokens=False):
            seen[encoding.ids] = True


def dataset_texts(root: str | Path) -> Iterator[tuple[str, str]]:
    """Every passage and every query file of a dataset directory (either supported layout)."""
    root = Path(root)
    collection = next((root / n for n in ("collection.tsv", "corpus.jsonl") if (root / n).is_file()), None)
    if collection is None:
        raise FileNotFoundError(f"{root}: no collection.tsv or corpus.jsonl to build the vocabulary from")
    for _, text in formats.iter_collection(collection):
        yield "passage", text
    for path in sorted(root.glob("queries*.tsv")) + sorted(root.glob("queries*.jsonl")):
        for text in formats.read_queries(path).values():
            yield "query", text


def shrink_embeddings(model, shrink: VocabShrink):
    """A copy of the cross-encoder whose input embeddings hold only the kept rows, with a pair
    encoder that maps tokenizer ids into them. Scores are unchanged for text made of kept tokens."""
    shrunk = copy.deepcopy(model)
    embeddings = shrunk.backbone.get_input_embeddings()
    embeddings.weight = nn.Parameter(embeddings.weight.data[torch.from_numpy(shrink.kept)].clone(),
                                     requires_grad=False)
    embeddings.num_embeddings = len(shrink.kept)
    if getattr(embeddings, "padding_idx", None) is not None:
        embeddings.padding_idx = int(shrink.vocab_map[embeddings.padding_idx])
    shrunk.backbone.config.vocab_size = len(shrink.kept)
    shrunk.pairs = PairEncoder(model.pairs.tokenizer, model.pairs.format, shrink.vocab_map)
    return shrunk
