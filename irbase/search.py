"""The one interface every first stage, reranker and pipeline answers, so the benchmark harness
measures them all the same way."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


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
