"""Ranking metrics over a run (`qid -> ranked pids`) and qrels (`qid -> {pid: grade}`).

Conventions (checked against ir-measures / trec_eval in the tests):
- `recall@1` is the headline and means hit@1: the share of queries whose first result is relevant.
  For k > 1, `recall@k` is the share of a query's relevant passages found in its top k.
- A passage is relevant when its grade >= `min_relevance` (1 for MS MARCO; 2 for TREC DL binary
  measures). nDCG uses the graded gains of every judgement with grade > 0, with linear gain and a
  log2(rank + 1) discount, as trec_eval does.
- Queries without a relevant passage are left out and counted; a judged query missing from the run
  scores zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

Run = Mapping[str, Sequence[str]]


@dataclass
class Evaluation:
    means: dict[str, float]
    per_query: dict[str, dict[str, float]]
    num_queries: int
    no_relevant: int = 0  # judged queries left out: no passage reaches min_relevance
    missing_from_run: int = 0
    notes: list[str] = field(default_factory=list)


def reciprocal_rank(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    for rank, pid in enumerate(ranked[:k], 1):
        if pid in relevant:
            return 1.0 / rank
    return 0.0


def recall(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def hit(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    return float(any(pid in relevant for pid in ranked[:k]))


def ndcg(ranked: Sequence[str], grades: Mapping[str, int], k: int) -> float:
    dcg = sum(max(grades.get(pid, 0), 0) / math.log2(rank + 1) for rank, pid in enumerate(ranked[:k], 1))
    ideal_gains = sorted((g for g in grades.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(ideal_gains, 1))
    return dcg / idcg if idcg > 0 else 0.0


def _dedupe(ranked: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    return [pid for pid in ranked if not (pid in seen or seen.add(pid))]


def evaluate(run: Run, qrels: Mapping[str, Mapping[str, int]], *, min_relevance: int = 1,
             recall_ks: Sequence[int] = (1, 10, 100), mrr_k: int = 10, ndcg_k: int = 10) -> Evaluation:
    """Per-query and mean metrics; names are `recall@k`, `mrr@{mrr_k}`, `ndcg@{ndcg_k}`."""
    per_query: dict[str, dict[str, float]] = {}
    no_relevant = missing = 0
    for qid, grades in qrels.items():
        relevant = {pid for pid, g in grades.items() if g >= min_relevance}
        if not relevant:
            no_relevant += 1
            continue
        if qid not in run:
            missing += 1
        ranked = _dedupe(run.get(qid, ()))
        scores = {f"recall@{k}": (hit(ranked, relevant, 1) if k == 1 else recall(ranked, relevant, k))
                  for k in recall_ks}
        scores[f"mrr@{mrr_k}"] = reciprocal_rank(ranked, relevant, mrr_k)
        scores[f"ndcg@{ndcg_k}"] = ndcg(ranked, grades, ndcg_k)
        per_query[qid] = scores
    names = [f"recall@{k}" for k in recall_ks] + [f"mrr@{mrr_k}", f"ndcg@{ndcg_k}"]
    n = len(per_query)
    means = {name: (sum(q[name] for q in per_query.values()) / n if n else 0.0) for name in names}
    notes = []
    if no_relevant:
        notes.append(f"{no_relevant} judged queries have no passage with grade >= {min_relevance}: left out")
    if missing:
        notes.append(f"{missing} judged queries are missing from the run: scored 0")
    return Evaluation(means, per_query, n, no_relevant, missing, notes)
