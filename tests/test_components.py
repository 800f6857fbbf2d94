"""Components behind the two interfaces: a first stage and a reranker registered from outside the
packages are served by `Retriever` and measured by `benchmarks.run` with no other module touched; the registries
refuse what they do not know. (That the served ranking and the offline sweep's agree is
test_pipeline.py's test_sweep_offline_rankings_are_what_the_retriever_serves.)"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from irbase.components import FirstStage, Query, Registry
from tests.conftest import PASSAGES, QRELS, QUERIES, copy_tiny_run, write_tsv


class WordOverlap(FirstStage):
    """Passages ranked by how many of the query's words they share (ties by id): no index, no vector."""
    timing = "overlap"

    def __init__(self, texts: dict[str, str]):
        self.texts = texts

    @classmethod
    def load(cls, run) -> "WordOverlap":
        from irbase.formats import iter_collection

        return cls(dict(iter_collection(run.record.corpus["path"])))

    def score(self, query: Query, pids: Sequence[str]) -> list[float]:
        words = set(query.text.lower().split())
        return [float(len(words & set(self.texts[p].lower().split()))) for p in pids]

    def search(self, query: Query, k: int) -> tuple[list[str], list[float]]:
        pids = sorted(self.texts)
        ranked = sorted(zip(pids, self.score(query, pids)), key=lambda x: -x[1])[:k]
        return [p for p, _ in ranked], [s for _, s in ranked]


class ShortestFirst:
    """Prefers short passages: an order no first stage here produces, so its effect is visible."""
    variant = "toy"

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        return np.asarray([-float(len(p)) for p in passages], dtype=np.float32)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, built_tiny_run) -> Path:
    return copy_tiny_run(built_tiny_run, tmp_path_factory.mktemp("components"))


@pytest.fixture
def toy_run(tiny_run, tmp_path):
    from pipeline.config import RunRecord
    from pipeline.first_stages import FIRST_STAGES
    from pipeline.rerankers import RERANKERS

    run = copy_tiny_run(tiny_run, tmp_path / "toy")
    FIRST_STAGES.register("toy-overlap", WordOverlap)
    RERANKERS.register("toy-short", lambda context, variant: ShortestFirst())
    record = RunRecord.load(run)
    record.serving.first_stage, record.serving.reranker, record.serving.depth = "toy-overlap", "toy-short", 2
    record.save(run)
    yield run
    FIRST_STAGES.unregister("toy-overlap")
    RERANKERS.unregister("toy-short")


def test_a_registered_first_stage_and_reranker_are_served_and_benchmarked(toy_run, tmp_path, capsys):
    from benchmarks.run import main as run_main
    from pipeline import Retriever

    retriever = Retriever(toy_run)
    assert isinstance(retriever.first_stage, WordOverlap) and isinstance(retriever.reranker, ShortestFirst)
    query = "who painted the mona lisa"
    first = WordOverlap(dict(PASSAGES)).search(Query(query), 5)[0]
    response = retriever.search_detailed(query, 5)
    ids = [r.document_id for r in response.results]
    head = sorted(first[:2], key=lambda p: len(PASSAGES[p]))   # the toy reranker's order of the top 2
    assert ids == head + first[2:] and response.reranked == 2
    assert set(response.timings_ms) == {"encode", "overlap", "fetch", "rerank", "total"}
    assert response.timings_ms["encode"] == 0.0   # no stage asked for the bi-encoder's vector

    data = toy_run.parent / "data"
    write_tsv(data / "queries.dev.tsv", QUERIES.items())
    write_tsv(data / "qrels.dev.tsv", [(q, 0, p, r) for q, j in QRELS.items() for p, r in j.items()])
    out = tmp_path / "bench"
    assert run_main(["--system", "pipeline", "--data", str(data), "--split", "dev", "--out", str(out),
                     f"run.dir={toy_run}", "benchmark.warmup=1"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["serving"]["first_stage"] == "toy-overlap"
    assert saved["config"]["serving"]["reranker"] == "toy-short"
    assert len((out / "run.trec").read_text().splitlines()) > 0


def test_registries_refuse_unknown_and_duplicate_names_and_import_dotted_ones():
    registry: Registry = Registry("first stage", {"dense": WordOverlap})
    with pytest.raises(ValueError, match=r"unknown first stage 'splade': registered are dense"):
        registry.get("splade")
    with pytest.raises(ValueError, match=r"first stage 'dense' is already registered"):
        registry.register("dense", WordOverlap)
    assert registry.get("tests.test_components:WordOverlap") is WordOverlap


def test_an_unknown_first_stage_in_the_run_is_refused_by_name(tiny_run, tmp_path):
    from pipeline import Retriever
    from pipeline.config import RunRecord

    run = copy_tiny_run(tiny_run, tmp_path)
    record = RunRecord.load(run)
    record.serving.first_stage = "splade"
    record.save(run)
    with pytest.raises(ValueError, match=r"unknown first stage 'splade': registered are dense, bm25, hybrid"):
        Retriever(run)
