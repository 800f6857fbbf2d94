"""BM25 (bm25s) over the run's passages, each expanded with its generated queries when the run's
`bm25.expansion` names a query filter's decisions; the store still returns the passage's own text."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from irbase.artifacts import ArtifactError
from irbase.bm25 import BM25Config, BM25Index, expansion_inputs, read_expansions
from irbase.components import FirstStage, Query


class BM25Stage(FirstStage):
    timing = "bm25"

    def __init__(self, index: BM25Index):
        self.index = index

    @classmethod
    def build(cls, run, passages: Sequence[tuple[str, str]]) -> None:
        config = BM25Config(**run.record.bm25)  # its expansion path was filled in by the build
        expansions = read_expansions(config.expansion, config.expansion_keep) if config.expansion else None
        BM25Index.build(passages, config, expansions).save(run.corpus / "bm25", {"collection": run.collection,
                                                                                 **expansion_inputs(config)})

    @classmethod
    def load(cls, run) -> "BM25Stage":
        if not (run.corpus / "bm25" / "manifest.json").is_file():
            raise ArtifactError(f"{run.corpus} has no BM25 index for the {run.serving.first_stage} first stage: "
                                "call embed_and_store_corpus or run python -m pipeline.build")
        return cls(BM25Index.load(run.corpus / "bm25", {"collection": run.store.collection}, verify=run.verify))

    def _scores(self, query: Query) -> np.ndarray:
        """Every passage's score, computed once per query: the top k and fusion's lookups share it."""
        key = f"bm25:{id(self)}"
        if key not in query.memo:
            query.memo[key] = self.index.scores(query.text)
        return query.memo[key]

    def search(self, query: Query, k: int) -> tuple[list[str], list[float]]:
        top = self.index.top_ids(self._scores(query), k)
        return [p for p, _ in top], [s for _, s in top]

    def score(self, query: Query, pids: Sequence[str]) -> list[float]:
        return [float(s) for s in self._scores(query)[self.index.rows(list(pids))]]
