"""Effectiveness and latency of a searcher on one split, one query at a time, as a user would call it."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from irbase.dataset import Dataset
from irbase.metrics import Evaluation, evaluate
from irbase.search import Searcher


@dataclass
class BenchmarkConfig:
    k: int = 100
    warmup: int = 20
    min_relevance: int = 1
    queries: int | None = None   # a fixed random subset of the judged queries (None: all)
    seed: int = 13


@dataclass
class BenchmarkResult:
    evaluation: Evaluation
    latencies_ms: dict[str, float]
    run: dict[str, list[tuple[str, float]]]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latency(self) -> dict[str, float]:
        return latency_summary(list(self.latencies_ms.values()))


def latency_summary(latencies_ms: list[float]) -> dict[str, float]:
    if not latencies_ms:
        return {}
    values = np.asarray(latencies_ms, dtype=float)
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
            "p99": float(np.percentile(values, 99)), "mean": float(values.mean()),
            "max": float(values.max()), "n": int(values.size)}


def select_queries(dataset: Dataset, limit: int | None, seed: int) -> list[tuple[str, str]]:
    """All judged queries, or the same random `limit` of them for every system compared."""
    queries = sorted(dataset.queries.items())
    if limit is not None and limit < len(queries):
        queries = sorted(random.Random(seed).sample(queries, limit))
    return queries


def run_benchmark(searcher: Searcher, dataset: Dataset, config: BenchmarkConfig,
                  progress: bool = True) -> BenchmarkResult:
    """Warm up on the first queries (untimed), then time every judged query separately."""
    queries = select_queries(dataset, config.queries, config.seed)
    if not queries:
        raise ValueError(f"split {dataset.split!r} has no judged queries to evaluate")
    for _, text in queries[: config.warmup]:
        searcher.search(text, config.k)
    run: dict[str, list[tuple[str, float]]] = {}
    latencies: dict[str, float] = {}
    for qid, text in tqdm(queries, desc=f"searching {dataset.split}", unit="q", disable=not progress):
        start = time.perf_counter()
        results = searcher.search(text, config.k)
        latencies[qid] = (time.perf_counter() - start) * 1000.0
        run[qid] = [(r.document_id, r.score) for r in results]
    ranked = {qid: [pid for pid, _ in hits] for qid, hits in run.items()}
    evaluation = evaluate(ranked, {qid: dataset.qrels[qid] for qid in ranked}, min_relevance=config.min_relevance)
    return BenchmarkResult(evaluation, latencies, run)
