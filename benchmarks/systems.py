"""Named systems the harness can build, plus `module:attr` for anything with `search(query, k)`."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from irbase.artifacts import file_fingerprint
from irbase.bm25 import build_or_load, configured
from irbase.config import load_section
from irbase.dataset import Dataset
from irbase.runconfig import RunConfig, stage_dir
from irbase.search import Result, Searcher

from irbase.fusion import fuse_reranked, merge_reranked


def _bm25(config_path: str | None, overrides: list[str], dataset: Dataset) -> tuple[Searcher, dict[str, Any]]:
    config, run_dir = configured(config_path, overrides)
    return build_or_load(run_dir, dataset, config), {"bm25": config, "run_dir": str(run_dir)}


def _biencoder(config_path: str | None, overrides: list[str], dataset: Dataset) -> tuple[Searcher, dict[str, Any]]:
    from biencoder.retriever import DenseRetriever

    base = stage_dir(config_path, overrides, "biencoder")
    retriever = DenseRetriever(base / "model", base / "index", dataset.collection)
    return retriever, {"run_dir": str(base), "index": retriever.index.config}


def _pipeline(config_path: str | None, overrides: list[str], dataset: Dataset,
              **serving: Any) -> tuple[Searcher, dict[str, Any]]:
    from pipeline.retriever import Retriever

    run = load_section(config_path, "run", RunConfig, overrides)
    retriever = Retriever(run.dir, **serving)
    if retriever.record.corpus and retriever.record.corpus.get("collection") != file_fingerprint(
            dataset.collection_path):
        raise ValueError(f"{run.dir} indexes another collection than {dataset.collection_path}; "
                         "call Retriever.embed_and_store_corpus on it first")
    retriever.warmup()
    return retriever, retriever.describe()


class RerankedSearcher:
    """A first stage whose top `depth` candidates the ONNX reranker reorders, the rest kept below in
    first-stage order; no deadline, so the full cost is measured. `order(ids, first-stage scores, reranker
    scores)` gives the reranked candidates' final order (irbase.fusion)."""

    def __init__(self, first: Searcher, reranker, candidates: int, depth: int,
                 order: Callable[[list[str], list[float], list[float]], list[tuple[str, float]]]):
        self.first, self.reranker, self.candidates, self.depth, self.order = first, reranker, candidates, depth, order

    def search(self, query: str, k: int) -> list[Result]:
        hits = self.first.search(query, max(k, self.candidates))
        head, tail = hits[: self.depth], hits[self.depth:]
        scores = [float(s) for s in self.reranker.score(query, [h.document_text for h in head])]
        texts = {h.document_id: h.document_text for h in hits}
        order = self.order([h.document_id for h in head], [h.score for h in head], scores)
        merged = merge_reranked(order, [h.document_id for h in tail], [h.score for h in tail])
        return [Result(pid, texts[pid], score) for pid, score in merged[:k]]


def bm25_reranked(config_path: str | None, overrides: list[str], dataset: Dataset,
                   depth: int | None = None) -> tuple[Searcher, dict[str, Any]]:
    """BM25 with the pipeline's reranker at the pipeline's depth (or `depth`), variant and fusion: the
    pipeline with BM25 alone as its first stage (under score fusion, its first-stage score without the
    dense term: bm25_weight x BM25)."""
    from pipeline.config import RunRecord
    from pipeline.context import RunContext
    from pipeline.rerankers import RERANKERS

    run = load_section(config_path, "run", RunConfig, overrides)
    record = RunRecord.load(Path(run.dir))
    serving = record.serving
    bm25, info = _bm25(config_path, overrides, dataset)
    reranker = RERANKERS.get(serving.reranker)(RunContext(Path(run.dir), record, serving), serving.variant)
    depth = serving.depth if depth is None else depth
    def order(ids, first, scores):
        return fuse_reranked(serving.fusion, ids, [serving.bm25_weight * f for f in first], scores,
                             serving.rerank_weight, serving.fusion_k)
    return RerankedSearcher(bm25, reranker, serving.candidates, depth, order), \
        {**info, "reranker": serving.variant, "depth": depth, "candidates": serving.candidates,
         "fusion": serving.fusion, "rerank_weight": serving.rerank_weight}


SYSTEMS: dict[str, Callable[[str | None, list[str], Dataset], tuple[Searcher, dict[str, Any]]]] = {
    "bm25": _bm25,
    "biencoder": _biencoder,
    "bm25+reranker": bm25_reranked,
    "pipeline": _pipeline,
    # the built run's own first stages, without reranking (they need no other artifacts than the run)
    "pipeline-dense": lambda c, o, d: _pipeline(c, o, d, depth=0, first_stage="dense"),
    "pipeline-hybrid": lambda c, o, d: _pipeline(c, o, d, depth=0, first_stage="hybrid"),
    "pipeline-hybrid-rrf": lambda c, o, d: _pipeline(c, o, d, depth=0, first_stage="hybrid", fusion="rrf"),
}


def make_system(name: str, config_path: str | None, overrides: list[str],
                dataset: Dataset) -> tuple[Searcher, dict[str, Any]]:
    """A registered system, or `package.module:Factory` called with no arguments."""
    if name in SYSTEMS:
        return SYSTEMS[name](config_path, overrides, dataset)
    if ":" not in name:
        raise ValueError(f"--system {name!r}: expected one of {', '.join(SYSTEMS)} or module:attr")
    module_name, attr = name.split(":", 1)
    factory = getattr(importlib.import_module(module_name), attr)
    searcher = factory()
    if not isinstance(searcher, Searcher):
        raise TypeError(f"--system {name!r} built a {type(searcher).__name__}, which has no search(query, k)")
    return searcher, {"factory": name}
