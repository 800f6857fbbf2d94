"""Fusing first stages (BM25 with the bi-encoder), and the reranker with the first stage: by reciprocal rank
(`rrf`, no score scales to calibrate) or by a weighted sum of scores (`score`, weights fitted on a tuning split
by `python -m tuning.fusion`); and merging a reranked head with the rest. BM25 and the bi-encoder miss
different positives (on mini dev their fused top 30 holds 97% of positives against 94% and 91% alone)."""
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


def weighted_scores(columns: Sequence[Sequence[float]], weights: Sequence[float]) -> list[float]:
    """Per candidate, the weighted sum of its scores (one column per first stage, same candidates)."""
    if len(columns) != len(weights) or len({len(c) for c in columns}) > 1:
        raise ValueError(f"{len(weights)} weights for {len(columns)} score columns of lengths "
                         f"{[len(c) for c in columns]}")
    fused = [weights[0] * float(s) for s in columns[0]]
    for weight, column in zip(weights[1:], columns[1:]):
        fused = [f + weight * float(s) for f, s in zip(fused, column)]
    return fused


def weighted_fusion(pids: Sequence[str], columns: Sequence[Sequence[float]],
                    weights: Sequence[float]) -> list[tuple[str, float]]:
    """(id, weighted sum of its first-stage scores) by descending score, ties in input order."""
    if any(len(c) != len(pids) for c in columns):
        raise ValueError(f"{len(pids)} candidates but score columns of lengths {[len(c) for c in columns]}")
    return sorted(zip(pids, weighted_scores(columns, weights)), key=lambda item: -item[1])


def linear_fusion(pids: Sequence[str], dense: Sequence[float], lexical: Sequence[float],
                  bm25_weight: float) -> list[tuple[str, float]]:
    """(id, dense inner product + bm25_weight x BM25 score) by descending score, every candidate scored by
    both models. On mini dev this beats rank fusion by 0.04 recall@1 (p 0.0001): ranks throw away how far
    ahead the leader is, and that margin is what decides rank 1 (benchmarks/reports/pipeline-mini-dev.md)."""
    if not len(pids) == len(dense) == len(lexical):
        raise ValueError(f"{len(pids)} candidates but {len(dense)} dense and {len(lexical)} BM25 scores")
    return weighted_fusion(pids, [dense, lexical], [1.0, bm25_weight])


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


def merge_reranked(reranked: Sequence[tuple[str, float]], tail: Sequence[str],
                   tail_scores: Sequence[float]) -> list[tuple[str, float]]:
    """The final ranking of one query: the reranked head in its fused order, then the first stage's tail in
    first-stage order, scored just below the head (a rank list's scores must fall with rank, and the
    reranker's scale is not the first stage's). With nothing reranked, the tail keeps its own scores. The
    one merge every caller uses: the served pipeline, the offline sweep, the benchmarks and the evaluation."""
    if len(tail) != len(tail_scores):
        raise ValueError(f"{len(tail)} tail candidates but {len(tail_scores)} scores")
    if not reranked:
        return [(p, float(s)) for p, s in zip(tail, tail_scores)]
    floor = min(s for _, s in reranked)
    return [*reranked, *((p, floor - 1.0 - i * 1e-3) for i, p in enumerate(tail))]
