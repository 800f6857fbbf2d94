"""Reranking a first stage's candidates and scoring the result: the measure of a reranker."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from irbase.dataset import Dataset
from irbase.fusion import merge_reranked
from irbase.metrics import evaluate


class Scorer(Protocol):
    def score(self, query: str, passages: Sequence[str]) -> np.ndarray: ...


@dataclass
class RerankEvalConfig:
    queries: int | None = 200   # a fixed random subset of judged dev queries (None: all)
    depth: int = 100            # candidates reranked per query


def eval_queries(dataset: Dataset, limit: int | None, seed: int) -> list[str]:
    qids = sorted(dataset.queries)
    if limit is not None and limit < len(qids):
        qids = sorted(random.Random(seed).sample(qids, limit))
    return qids


def rerank(scorer: Scorer, dataset: Dataset, candidates: Mapping[str, Sequence[str]], qids: Sequence[str],
           depth: int, desc: str = "reranking") -> tuple[dict[str, list[tuple[str, float]]], list[float]]:
    """(reranked run, per-query scoring latency in ms); candidates below `depth` keep first-stage order."""
    collection = dataset.collection
    run, latencies = {}, []
    for qid in tqdm(qids, desc=desc, unit="q"):
        pids = list(candidates.get(qid, []))
        head, tail = pids[:depth], pids[depth:]
        start = time.perf_counter()
        scores = scorer.score(dataset.all_queries[qid], [collection[p] for p in head]) if head else np.zeros(0)
        latencies.append((time.perf_counter() - start) * 1000.0)
        order = np.argsort(-scores, kind="stable")
        ranked = [(head[i], float(scores[i])) for i in order]
        run[qid] = merge_reranked(ranked, tail, [-float(i) for i in range(len(tail))])
    return run, latencies


def metrics(run: Mapping[str, Sequence[tuple[str, float]]], dataset: Dataset, min_relevance: int = 1) -> dict[str, float]:
    ranked = {qid: [p for p, _ in hits] for qid, hits in run.items()}
    qrels = {qid: dataset.qrels[qid] for qid in ranked}
    return evaluate(ranked, qrels, min_relevance=min_relevance).means
