"""The system users touch: a first stage (by default the bi-encoder's HNSW and BM25, fused) and a reranker
(by default the ONNX cross-encoder) under a deadline, each picked by name from the run's recipe.

    from pipeline import Retriever
    retriever = Retriever()                 # the default run (see pipeline.config.default_run_dir)
    retriever.search("what is the capital of australia", k=10)
"""
from __future__ import annotations

import time
from copy import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from irbase import formats
from irbase.artifacts import ArtifactError, file_fingerprint, model_fingerprint
from irbase.components import FirstStage, Query, Reranker
from irbase.fusion import fuse_reranked, merge_reranked
from irbase.lm import compute_device
from irbase.search import Result, check_query

from biencoder.model import BiEncoder
from pipeline.budget import DeadlineLock, PairCost
from pipeline.config import BUILD_HINT, RunRecord, ServingConfig, default_run_dir
from pipeline.context import CORPUS_DIR, RunContext
from pipeline.first_stages import FIRST_STAGES
from pipeline.rerankers import RERANKERS
from pipeline.store import PassageStore

# the serving settings a first stage is assembled from (the others are read at each search)
FIRST_STAGE_SETTINGS = {"first_stage", "hybrid", "fusion", "fusion_k", "dense_weight", "bm25_weight"}


@dataclass
class SearchResponse:
    results: list[Result]
    # encode, then each first stage's own (ann: dense, bm25, fusion: hybrid), fetch, rerank, total
    timings_ms: dict[str, float] = field(default_factory=dict)
    reranked: int = 0          # candidates the reranker scored
    depth: int = 0             # candidates it was asked to score
    cut_by_deadline: bool = False


class Retriever:
    """Thread-safe: `search` may be called from several threads at once."""

    def __init__(self, run_dir: str | Path | None = None, *, depth: int | None = None, variant: str | None = None,
                 latency_budget_ms: float | None = None, threads: int | None = None, first_stage: str | None = None,
                 fusion: str | None = None, verify: bool = True):
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir()
        self.record = RunRecord.load(self.run_dir)
        overrides = {k: v for k, v in {"depth": depth, "variant": variant, "latency_budget_ms": latency_budget_ms,
                                       "threads": threads, "first_stage": first_stage,
                                       "fusion": fusion}.items() if v is not None}
        self.serving: ServingConfig = replace(self.record.serving, **overrides)
        if self.serving.depth < 0:
            raise ValueError(f"depth must be >= 0, got {self.serving.depth}")
        if self.serving.threads:
            torch.set_num_threads(self.serving.threads)
        model_dir = self.run_dir / self.serving.biencoder / "model"
        if not model_dir.is_dir():
            raise ArtifactError(f"{model_dir} is missing: the run is half built. Finish it with: {BUILD_HINT}")
        self.model_id = model_fingerprint(model_dir) if verify else self.record.fingerprints.get("biencoder", "")
        if verify and self.record.fingerprints.get("biencoder") not in (None, self.model_id):
            raise ArtifactError(f"{model_dir} is not the bi-encoder this run was built with (weights changed); "
                                f"rebuild with: {BUILD_HINT}")
        self.model = BiEncoder.load(model_dir).eval().to(compute_device())  # queries encode on a GPU when there is one
        self.context = RunContext(self.run_dir, self.record, self.serving, self.model, self.model_id, verify=verify)
        self.reranker: Reranker | None = self._load_reranker(self.serving.variant) if self.serving.depth > 0 else None
        self.first_stage: FirstStage | None = None
        self.store: PassageStore | None = None
        if self.record.corpus:
            self._load_corpus()
        # One model forward at a time (query encoding or a rerank batch), earliest deadline first: each
        # already uses every core. A rerank batch is priced once its turn comes, so time spent queueing
        # behind other searches is seen by the deadline.
        self._compute = DeadlineLock()
        self.cost = PairCost()  # decides how many candidates fit before each search's deadline

    def reconfigured(self, **changes) -> "Retriever":
        """This retriever serving other settings, sharing its models and store: what tuning grids need. The
        first stage and the reranker are assembled again when a setting they were built from changes."""
        other = copy(self)
        other.serving = replace(self.serving, **changes)
        other.context = replace(self.context, serving=other.serving)
        if self.first_stage is not None and changes.keys() & FIRST_STAGE_SETTINGS:
            other.first_stage = FIRST_STAGES.get(other.serving.first_stage).load(other.context)
        if self.reranker is not None and changes.keys() & {"reranker", "variant", "crossencoder", "rerank_batch"}:
            other.reranker = other._load_reranker(other.serving.variant)
        return other

    def _load_reranker(self, variant: str) -> Reranker:
        return RERANKERS.get(self.serving.reranker)(self.context, variant)

    def _load_corpus(self) -> None:
        self.store = self.context.store = PassageStore(self.run_dir / CORPUS_DIR / "passages.sqlite",
                                                       verify=self.context.verify)
        self.first_stage = FIRST_STAGES.get(self.serving.first_stage).load(self.context)

    def embed_and_store_corpus(self, corpus_path: str | Path, embeddings_dir: str | Path | None = None) -> None:
        """Store a collection (TSV or BEIR JSONL) and build what the served first stage reads (for the
        dense one: encoding with this run's bi-encoder, resumable by shard, and the HNSW index); persisted
        in the run."""
        corpus_path = Path(corpus_path)
        passages = list(formats.iter_collection(corpus_path))
        if not passages:
            raise ValueError(f"{corpus_path}: no passages")
        collection = file_fingerprint(corpus_path)
        corpus = self.run_dir / CORPUS_DIR
        shards = Path(embeddings_dir) if embeddings_dir else corpus / "embeddings"
        building = replace(self.context, collection=collection, embeddings_dir=shards)
        FIRST_STAGES.get(self.serving.first_stage).build(building, passages)
        PassageStore.build(corpus / "passages.sqlite", passages, collection, total=len(passages))
        self.record.corpus = {"collection": collection, "path": str(corpus_path.resolve()), "passages": len(passages),
                              "embeddings": str(shards)}
        self.record.save(self.run_dir)
        self._load_corpus()

    def warmup(self, queries: int = 3) -> None:
        """Compile paths and seed the per-pair cost estimate before the first timed search."""
        for _ in range(queries):
            self.search("warm up the model", 10)

    def search(self, query: str, k: int) -> list[Result]:
        return self.search_detailed(query, k).results

    def search_detailed(self, query: str, k: int, depth: int | None = None) -> SearchResponse:
        check_query(query, k)
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)):
            raise TypeError(f"depth must be an int or None, got {type(depth).__name__}")
        if depth is not None and depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self._check_corpus()
        serving = self.serving
        depth = serving.depth if depth is None else depth
        if depth > 0 and self.reranker is None:
            self.reranker = self._load_reranker(serving.variant)
        start = time.perf_counter()
        usable_ms = serving.latency_budget_ms - serving.safety_ms
        deadline = start + usable_ms / 1000.0
        wanted = max(k, serving.candidates, depth)  # a depth beyond N widens the first stage: rerank what was asked
        pids, scores, timings = self._candidates(query, wanted, deadline)
        t = time.perf_counter()
        depth = min(depth, len(pids))
        texts = self.store.get_many(pids[: max(depth, k)])
        t = _lap(timings, "fetch", t)
        reranked, cut = self._rerank(query, pids[:depth], texts, deadline, usable_ms)
        t = _lap(timings, "rerank", t)
        head = [p for p, _ in reranked]
        fused = fuse_reranked(serving.fusion, head, scores[: len(head)], [sc for _, sc in reranked],
                              serving.rerank_weight, serving.fusion_k)
        ranked = merge_reranked(fused, pids[len(head):], scores[len(head):])[:k]
        missing = [p for p, _ in ranked if p not in texts]
        if missing:
            texts.update(self.store.get_many(missing))
        results = [Result(p, texts.get(p, ""), s) for p, s in ranked]
        timings["total"] = (time.perf_counter() - start) * 1000.0
        return SearchResponse(results, timings, len(reranked), depth, cut)

    def _rerank(self, query: str, head: list[str], texts: dict[str, str], deadline: float,
                usable_ms: float) -> tuple[list[tuple[str, float]], bool]:
        """The reranker's scores of the head, batch by batch while the deadline allows: (scored, cut)."""
        reranked: list[tuple[str, float]] = []
        cut = False
        while len(reranked) < len(head):
            position = len(reranked)
            wanted = min(self.serving.rerank_batch, len(head) - position)
            with self._compute.turn(deadline):
                remaining_ms = (deadline - time.perf_counter()) * 1000.0
                size = self.cost.affordable(remaining_ms, wanted)
                cut = size < wanted  # rerank the best candidates that fit, then stop
                if size == 0:
                    if not reranked and remaining_ms > usable_ms / 2:  # not queueing: the estimate is to blame
                        self.cost.relax()
                    break
                batch = head[position: position + size]
                batch_start = time.perf_counter()
                batch_scores = self.reranker.score(query, [texts[p] for p in batch])
                self.cost.observe((time.perf_counter() - batch_start) * 1000.0 / len(batch))
            reranked.extend(zip(batch, map(float, batch_scores)))
            if cut:
                break
        return reranked, cut

    def _check_corpus(self) -> None:
        if self.first_stage is None or self.store is None:
            raise ArtifactError(f"{self.run_dir} has no corpus yet: call embed_and_store_corpus(path) or run "
                                f"{BUILD_HINT}")

    def query(self, text: str, deadline: float | None = None) -> Query:
        """The query as the first stage takes it: encoded by the bi-encoder when the stage needs a vector."""
        query = Query(text)
        if self.first_stage is not None and self.first_stage.needs_vector:
            start = time.perf_counter()
            with self._compute.turn(deadline if deadline is not None else start + 3600.0):
                query.vector = self.model.encode([text], "query", bf16=self.serving.query_bf16)
            query.timings_ms["encode"] = (time.perf_counter() - start) * 1000.0
        return query

    def _candidates(self, text: str, n: int, deadline: float | None) -> tuple[list[str], list[float], dict]:
        query = self.query(text, deadline)
        start = time.perf_counter()
        pids, scores = self.first_stage.search(query, n)
        query.timings_ms.setdefault(self.first_stage.timing, (time.perf_counter() - start) * 1000.0)
        return pids, scores, {"encode": 0.0, **query.timings_ms}

    def candidates(self, query: str, n: int) -> tuple[list[str], list[float]]:
        """The first stage's top n ids and scores, before any reranking: what tuning.sweep reranks offline
        to fit the depth and the reranker weight together."""
        check_query(query, n)
        self._check_corpus()
        pids, scores, _ = self._candidates(query, n, None)
        return pids, scores

    def describe(self) -> dict:
        """What is served and why: the settings, the corpus, and the fits that chose them (tuning.fusion,
        tuning.sweep: split, queries, gain, command, date and the values they replaced)."""
        return {"run_dir": str(self.run_dir), "serving": asdict(self.serving), "corpus": self.record.corpus,
                "tuned": {"fusion": self.record.fusion_fit, "sweep": self.record.sweep}}


def _lap(timings: dict[str, float], name: str, since: float) -> float:
    now = time.perf_counter()
    timings[name] = (now - since) * 1000.0
    return now
