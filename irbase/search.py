"""The one interface every first stage, reranker and pipeline answers, so the benchmark harness
measures them all the same way."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Result:
    document_id: str
    document_text: str
    score: float


@runtime_checkable
class Searcher(Protocol):
    def search(self, query: str, k: int) -> list[Result]:
        """Top-k results for one query, by descending score."""
        ...


def check_query(query: object, k: object) -> str:
    """Shared argument checks: a bad query is the caller's bug, never an empty result."""
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("query is empty or whitespace only")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return query


class RowLookup:
    """Passage id -> row of an index, for scoring named passages (score fusion). The map is built on first
    use: over millions of ids it costs memory that a dense-only or BM25-only search never needs."""

    def __init__(self, pids: Sequence, what: str):
        self._pids, self._what, self._rows = pids, what, None
        self._lock = threading.Lock()

    def __call__(self, pids: Sequence[str]) -> np.ndarray:
        if self._rows is None:
            with self._lock:
                if self._rows is None:
                    self._rows = {str(p): i for i, p in enumerate(self._pids)}
        unknown = [p for p in pids if p not in self._rows]
        if unknown:
            raise KeyError(f"{len(unknown)} passage ids are not in this {self._what} (first: {unknown[0]})")
        return np.fromiter((self._rows[p] for p in pids), dtype=np.int64, count=len(pids))
