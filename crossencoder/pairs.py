"""Turning (query, passage) pairs into model inputs, identically in training and in serving.

Only `tokenizers` and numpy: the ONNX runtime uses this without torch or transformers. The layout is
prefix + query + middle + passage + suffix (decoders: <bos> q p <eos>, scored at the last token;
encoders: [CLS] q [SEP] p [SEP]); only the passage is truncated, so the suffix token is always there.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

FORMAT_FILE = "pair_format.json"
VOCAB_MAP_FILE = "vocab_map.npy"


@dataclass
class PairFormat:
    prefix: list[int] = field(default_factory=list)
    middle: list[int] = field(default_factory=list)
    suffix: list[int] = field(default_factory=list)
    pad_id: int = 0
    unk_id: int = 0
    query_prefix: str = "query: "
    passage_prefix: str = " passage: "
    max_length: int = 192
    query_max_length: int = 32

    @classmethod
    def for_tokenizer(cls, tokenizer, decoder: bool, **texts) -> "PairFormat":
        """Special tokens from an HF tokenizer: decoders end on <eos>, encoders follow the BERT layout."""
        def ids(*tokens):
            return [t for t in tokens if t is not None]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else pad
        if decoder:
            return cls(ids(tokenizer.bos_token_id), [], ids(tokenizer.eos_token_id), pad, unk, **texts)
        cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        return cls(ids(cls_id), ids(sep_id), ids(sep_id), pad, unk, **texts)

    def special_ids(self) -> set[int]:
        return set(self.prefix) | set(self.middle) | set(self.suffix) | {self.pad_id, self.unk_id}


class PairEncoder:
    """Encodes pairs into right-padded int64 `input_ids` / `attention_mask` arrays."""

    def __init__(self, tokenizer, fmt: PairFormat, vocab_map: np.ndarray | None = None):
        from tokenizers import Tokenizer

        # a private copy: HF fast tokenizers keep the last call's padding/truncation on their backend
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.format = fmt
        self.vocab_map = vocab_map  # tokenizer id -> id in a shrunk vocabulary, -1 if dropped (crossencoder.vocab)
        self._fallback: dict[int, list[int]] = {}
        self._prefix, self._middle, self._suffix = self.map_ids(fmt.prefix), self.map_ids(fmt.middle), \
            self.map_ids(fmt.suffix)
        self._pad = self.map_ids([fmt.pad_id])[0]
        budget = fmt.max_length - len(fmt.prefix) - len(fmt.middle) - len(fmt.suffix)
        if budget <= fmt.query_max_length:
            raise ValueError(f"max_length {fmt.max_length} leaves no room for a passage after a "
                             f"{fmt.query_max_length}-token query and the special tokens")
        self._budget = budget

    @classmethod
    def from_dir(cls, path: str | Path) -> "PairEncoder":
        from tokenizers import Tokenizer

        path = Path(path)
        fmt = PairFormat(**json.loads((path / FORMAT_FILE).read_text(encoding="utf-8")))
        vocab_map = np.load(path / VOCAB_MAP_FILE) if (path / VOCAB_MAP_FILE).is_file() else None
        return cls(Tokenizer.from_file(str(path / "tokenizer.json")), fmt, vocab_map)

    def save(self, path: str | Path) -> None:
        """Into an existing (temporary) directory, next to the model files."""
        path = Path(path)
        self.tokenizer.save(str(path / "tokenizer.json"))
        (path / FORMAT_FILE).write_text(json.dumps(asdict(self.format), indent=1), encoding="utf-8")
        if self.vocab_map is not None:
            np.save(path / VOCAB_MAP_FILE, self.vocab_map)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        encoded = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        return encoded if self.vocab_map is None else [self.map_ids(ids) for ids in encoded]

    def map_ids(self, ids: list[int]) -> list[int]:
        """Into the shrunk vocabulary; a dropped token is spelled out in byte tokens (or becomes unk)."""
        if self.vocab_map is None:
            return list(ids)
        mapped = self.vocab_map[np.asarray(ids, dtype=np.int64)] if ids else np.zeros(0, dtype=np.int64)
        if (mapped >= 0).all():
            return mapped.tolist()
        out: list[int] = []
        for old, new in zip(ids, mapped.tolist()):
            out.extend([new] if new >= 0 else self._spell(old))
        return out

    def _spell(self, token_id: int) -> list[int]:
        if token_id not in self._fallback:
            text = (self.tokenizer.id_to_token(token_id) or "").replace("\u2581", " ")
            byte_ids = [self.tokenizer.token_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]
            spelled = [int(self.vocab_map[b]) for b in byte_ids if b is not None and self.vocab_map[b] >= 0]
            if not text or len(spelled) != len(byte_ids):
                spelled = [int(self.vocab_map[self.format.unk_id])]
            self._fallback[token_id] = spelled
        return self._fallback[token_id]

    def encode_query(self, query: str) -> list[int]:
        return self.token_ids([self.format.query_prefix + query])[0][: self.format.query_max_length]

    def encode(self, query: str, passages: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """One query against many passages: the query is tokenized once."""
        q = self.encode_query(query)
        return self._assemble([q] * len(passages), self.token_ids([self.format.passage_prefix + p for p in passages]))

    def encode_pairs(self, queries: Sequence[str], passages: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")
        qs = [q[: self.format.query_max_length] for q in self.token_ids([self.format.query_prefix + q for q in queries])]
        return self._assemble(qs, self.token_ids([self.format.passage_prefix + p for p in passages]))

    def _assemble(self, queries: list[list[int]], passages: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        rows = [self._prefix + q + self._middle + p[: self._budget - len(q)] + self._suffix
                for q, p in zip(queries, passages)]
        width = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), width), self._pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask
