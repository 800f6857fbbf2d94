"""Fusing BM25 with the bi-encoder, and the reranker with the first stage: by reciprocal rank (`rrf`, no
score scales to calibrate) or by a weighted sum of scores (`score`, weights fitted on a tuning split by
`python -m benchmarks.fusion`). BM25 and the bi-encoder miss different positives (on mini dev their fused
top 30 holds 97% of positives against 94% and 91% alone)."""
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


def linear_fusion(pids: Sequence[str], dense: Sequence[float], lexical: Sequence[float],
                  bm25_weight: float) -> list[tuple[str, float]]:
    """(id, dense inner product + bm25_weight x BM25 score) by descending score, every candidate scored by
    both models. On mini dev this beats rank fusion by 0.04 recall@1 (p 0.0001): ranks throw away how far
    ahead the leader is, and that margin is what decides rank 1 (benchmarks/reports/pipeline-mini-dev.md)."""
    if not len(pids) == len(dense) == len(lexical):
        raise ValueError(f"{len(pids)} candidates but {len(dense)} dense and {len(lexical)} BM25 scores")
    fused = [(p, float(d) + bm25_weight * float(s)) for p, d, s in zip(pids, dense, lexical)]
    return sorted(fused, key=lambda item: -item[1])


def rerank_by_score(head: Sequence[str], first_scores: Sequence[float], scores: Sequence[float],
                    weight: float | None) -> list[tuple[str, float]]:
    """The reranked candidates' final order under score fusion: first-stage score + weight x the reranker's
    score standardised over these candidates (its logit scale changes with every training run and
    quantization; a z-score does not). weight None: by reranker score alone."""
    if not len(head) == len(first_scores) == len(scores):
        raise ValueError(f"{len(head)} candidates but {len(first_scores)} first-stage and {len(scores)} scores")
    values = [float(s) for s in scores]
    if weight is None:
        fused = list(zip(head, values))
    else:
        mean = sum(values) / len(values) if values else 0.0
        spread = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5 if values else 0.0
        fused = [(p, float(f) + weight * ((v - mean) / spread if spread > 0 else 0.0))
                 for p, f, v in zip(head, first_scores, values)]
    return sorted(fused, key=lambda item: -item[1])


def fuse_reranked(fusion: str, head: Sequence[str], first_scores: Sequence[float], scores: Sequence[float],
                  weight: float | None, k: int) -> list[tuple[str, float]]:
    """The reranked candidates' final order under `pipeline.fusion` (`score`: rerank_by_score; `rrf`:
    rerank_order with constant k), one place for the pipeline and the benchmark systems."""
    if fusion == "score":
        return rerank_by_score(head, first_scores, scores, weight)
    return rerank_order(head, scores, k, weight)
