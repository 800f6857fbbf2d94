"""The two kinds of component a search pipeline is assembled from, and the registry that names them.

A first stage finds candidates in the whole collection and scores given ones (fusion needs both); a
reranker scores a query's candidates. `pipeline.first_stages` and `pipeline.rerankers` register the
implementations by name; a recipe picks them (`pipeline.first_stage`, `pipeline.reranker`).
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

import numpy as np


@dataclass
class Query:
    """One query on its way through the first stages: the text, the bi-encoder's embedding when a stage
    asked for one, and values a stage computes once per query and reuses (BM25's scores of every passage
    serve both its top k and the scores fusion asks of other stages' candidates)."""
    text: str
    vector: np.ndarray | None = None                    # shape (1, dim)
    memo: dict[str, Any] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)   # by each stage's `timing` name


class FirstStage(ABC):
    """Candidates from the whole collection. `load(run)` and `build(run, passages)` receive the pipeline's
    run context (`pipeline.first_stages.RunContext`: the run directory, its record, the bi-encoder, the
    passage store)."""
    needs_vector: bool = False   # the pipeline encodes the query with the bi-encoder first
    timing: str = "first_stage"  # its key in a search's timings

    @classmethod
    def build(cls, run: Any, passages: Sequence[tuple[str, str]]) -> None:
        """Write the artifacts `load` reads under the run's corpus directory (default: none)."""

    @classmethod
    @abstractmethod
    def load(cls, run: Any) -> "FirstStage":
        """The stage over the run's corpus; refuses artifacts built for another collection or model."""

    @abstractmethod
    def search(self, query: Query, k: int) -> tuple[list[str], list[float]]:
        """The top k ids and their scores, best first."""

    @abstractmethod
    def score(self, query: Query, pids: Sequence[str]) -> list[float]:
        """This stage's scores of the given passages (any ids of the collection), in input order."""


class Reranker(ABC):
    """Scores a query's candidates; higher is better. `OnnxReranker` and `CrossEncoder` have this shape."""

    @abstractmethod
    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """float32 scores, one per passage, in input order."""


F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[F]):
    """Factories by name. A name with a colon (`package.module:attr`) is imported, so a component can
    live outside this repository and still be named in a recipe."""

    def __init__(self, kind: str, factories: dict[str, F] | None = None):
        self.kind, self._factories = kind, dict(factories or {})

    def register(self, name: str, factory: F, replace: bool = False) -> F:
        if name in self._factories and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered (replace=True to swap it)")
        self._factories[name] = factory
        return factory

    def unregister(self, name: str) -> None:
        self._factories.pop(name, None)

    def names(self) -> list[str]:
        return list(self._factories)

    def get(self, name: str) -> F:
        if name in self._factories:
            return self._factories[name]
        if ":" in name:
            module, attr = name.split(":", 1)
            return getattr(importlib.import_module(module), attr)
        raise ValueError(f"unknown {self.kind} {name!r}: registered are {', '.join(self._factories)}, "
                         "or name one as package.module:attr")
