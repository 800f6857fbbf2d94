"""Several first stages fused into one (`pipeline.hybrid`, by default the bi-encoder and BM25): they miss
different positives. `score` fusion ranks the union of their top k by the first stage's score plus
bm25_weight x each other's (every candidate scored by every stage); `rrf` by reciprocal rank, the first
stage counting dense_weight and the others 1, the others' rankings first so that ties go to them."""
from __future__ import annotations

import time
from typing import Sequence

from irbase.components import FirstStage, Query
from irbase.fusion import reciprocal_rank_fusion, weighted_fusion, weighted_scores

Found = list[tuple[list[str], list[float]]]   # each stage's (ids, scores)


class HybridStage(FirstStage):
    timing = "fusion"

    def __init__(self, stages: Sequence[FirstStage], fusion: str, bm25_weight: float, fusion_k: int,
                 dense_weight: float):
        if len(stages) < 2:
            raise ValueError(f"pipeline.hybrid: a hybrid fuses at least two first stages, got {len(stages)}")
        self.stages, self.fusion, self.bm25_weight = list(stages), fusion, bm25_weight
        self.fusion_k, self.dense_weight = fusion_k, dense_weight
        self.needs_vector = any(s.needs_vector for s in self.stages)

    @staticmethod
    def members(run) -> list[type[FirstStage]]:
        from pipeline.first_stages import FIRST_STAGES

        return [FIRST_STAGES.get(name) for name in run.serving.hybrid]

    @classmethod
    def build(cls, run, passages: Sequence[tuple[str, str]]) -> None:
        for member in cls.members(run):
            member.build(run, passages)

    @classmethod
    def load(cls, run) -> "HybridStage":
        s = run.serving
        return cls([m.load(run) for m in cls.members(run)], s.fusion, s.bm25_weight, s.fusion_k, s.dense_weight)

    def gather(self, query: Query, k: int) -> Found:
        """Each stage's top k, timed under its own name."""
        found = []
        for stage in self.stages:
            start = time.perf_counter()
            found.append(stage.search(query, k))
            query.timings_ms[stage.timing] = (time.perf_counter() - start) * 1000.0
        return found

    def features(self, query: Query, found: Found) -> tuple[list[str], list[list[float]]]:
        """The union of the stages' candidates (first stage's first) and every stage's score of each: what
        score fusion weighs (`tuning.fusion` fits bm25_weight on these)."""
        union = list(dict.fromkeys(p for ids, _ in found for p in ids))
        columns = []
        for stage, (ids, scores) in zip(self.stages, found):
            known = dict(zip(ids, scores))
            missing = [p for p in union if p not in known]
            known.update(zip(missing, stage.score(query, missing)))
            columns.append([known[p] for p in union])
        return union, columns

    def rank_fusion(self, found: Found) -> list[tuple[str, float]]:
        first, *others = [ids for ids, _ in found]
        return reciprocal_rank_fusion([*others, first], self.fusion_k, [1.0] * len(others) + [self.dense_weight])

    def weights(self, bm25_weight: float) -> list[float]:
        return [1.0] + [bm25_weight] * (len(self.stages) - 1)

    def search(self, query: Query, k: int) -> tuple[list[str], list[float]]:
        found = self.gather(query, k)
        start = time.perf_counter()
        if self.fusion == "rrf":
            fused = self.rank_fusion(found)[:k]
        else:
            fused = weighted_fusion(*self.features(query, found), self.weights(self.bm25_weight))[:k]
        query.timings_ms[self.timing] = (time.perf_counter() - start) * 1000.0
        return [p for p, _ in fused], [s for _, s in fused]

    def score(self, query: Query, pids: Sequence[str]) -> list[float]:
        if self.fusion == "rrf":
            raise ValueError("pipeline.fusion rrf: rank fusion gives no score to a passage outside its rankings; "
                             "nest a hybrid under score fusion")
        return weighted_scores([stage.score(query, pids) for stage in self.stages], self.weights(self.bm25_weight))
