"""Reciprocal rank fusion of first-stage rankings: BM25 and the bi-encoder miss different positives
(on mini dev their fused top 30 holds 97% of positives against 94% and 91% alone), and ranks fuse
without calibrating two unrelated score scales."""
from __future__ import annotations

from typing import Sequence


def reciprocal_rank_fusion(rankings: Sequence[Sequence[str]], k: int = 60,
                           weights: Sequence[float] | None = None) -> list[tuple[str, float]]:
    """(id, sum over rankings of weight / (k + rank)) by descending fused score; rank starts at 1.
    Ties keep the order of first appearance (earlier rankings first)."""
    if k < 0:
        raise ValueError(f"fusion k must be >= 0, got {k}")
    weights = list(weights) if weights is not None else [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    scores: dict[str, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, pid in enumerate(dict.fromkeys(ranking), start=1):
            scores[pid] = scores.get(pid, 0.0) + weight / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])


def rerank_order(head: Sequence[str], scores: Sequence[float], k: int,
                 weight: float | None) -> list[tuple[str, float]]:
    """The reranked candidates' final order. weight None: by reranker score (the scores returned are the
    reranker's). Otherwise the reranker's ranking is fused with the first stage's (`head` is in first-stage
    order) by reciprocal rank, the reranker counting `weight` times the first stage: a reranker that is
    weaker alone than the first stage still adds what the first stage misses (report)."""
    if len(head) != len(scores):
        raise ValueError(f"{len(head)} candidates but {len(scores)} scores")
    by_score = sorted(zip(head, map(float, scores)), key=lambda item: -item[1])
    if weight is None:
        return by_score
    return reciprocal_rank_fusion([list(head), [p for p, _ in by_score]], k, [1.0, weight])
