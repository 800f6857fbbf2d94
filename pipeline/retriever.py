"""The system users touch: bi-encoder + HNSW first stage, ONNX cross-encoder rerank under a deadline.

    from pipeline import Retriever
    retriever = Retriever()                 # the default run (see pipeline.config.default_run_dir)
    retriever.search("what is the capital of australia", k=10)
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from irbase import formats
from irbase.artifacts import ArtifactError, file_fingerprint, model_fingerprint, read_manifest
from irbase.bm25 import BM25Config, BM25Index, expansion_inputs, read_expansions
from irbase.lm import compute_device
from irbase.search import Result, check_query

from biencoder.encode import EncodeConfig, encode_collection
from biencoder.index import KIND as INDEX_KIND, DenseIndex, IndexConfig
from biencoder.model import BiEncoder
from crossencoder.runtime import OnnxReranker
from pipeline.budget import DeadlineLock, PairCost
from pipeline.config import BUILD_HINT, RunRecord, ServingConfig, default_run_dir
from pipeline.fusion import fuse_reranked, linear_fusion, reciprocal_rank_fusion
from pipeline.store import PassageStore

CORPUS_DIR = "corpus"


@dataclass
class SearchResponse:
    results: list[Result]
    timings_ms: dict[str, float] = field(default_factory=dict)  # encode, ann, bm25 (hybrid), fetch, rerank, total
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
        self.reranker = self._load_reranker(self.serving.variant) if self.serving.depth > 0 else None
        self.index: DenseIndex | None = None
        self.bm25: BM25Index | None = None
        self.store: PassageStore | None = None
        if self.record.corpus:
            self._load_corpus()
        # One model forward at a time (query encoding or a rerank batch), earliest deadline first: each
        # already uses every core. A rerank batch is priced once its turn comes, so time spent queueing
        # behind other searches is seen by the deadline.
        self._compute = DeadlineLock()
        self.cost = PairCost()  # decides how many candidates fit before each search's deadline

    def _load_reranker(self, variant: str) -> OnnxReranker:
        path = self.run_dir / self.serving.crossencoder / "onnx" / variant
        if not (path / "model.onnx").is_file():
            raise ArtifactError(f"{path} holds no exported cross-encoder: the run is half built. "
                                f"Finish it with: {BUILD_HINT}")
        reranker = OnnxReranker(path, threads=self.serving.threads, batch_size=self.serving.rerank_batch)
        expected = self.record.fingerprints.get("crossencoder")
        if expected and reranker.manifest.get("model") != expected:
            raise ArtifactError(f"{path} was exported from another cross-encoder than this run's; "
                                f"rebuild with: {BUILD_HINT}")
        return reranker

    def _load_corpus(self) -> None:
        corpus = self.run_dir / CORPUS_DIR
        self.index = DenseIndex.load(corpus / "index", {"model": self.model_id})
        self.store = PassageStore(corpus / "passages.sqlite")
        indexed = read_manifest(corpus / "index", INDEX_KIND)["inputs"].get("collection")
        if indexed != self.store.collection:
            raise ArtifactError(f"{corpus}: the passage store holds another collection than the index "
                                f"({self.store.collection[:19]}... vs {str(indexed)[:19]}...); rebuild with "
                                "embed_and_store_corpus or " + BUILD_HINT)
        if len(self.store) != self.index.index.ntotal:
            raise ArtifactError(f"{corpus}: {len(self.store)} stored passages but {self.index.index.ntotal} indexed")
        if self.serving.first_stage == "hybrid":
            if not (corpus / "bm25" / "manifest.json").is_file():
                raise ArtifactError(f"{corpus} has no BM25 index for the hybrid first stage: call "
                                    f"embed_and_store_corpus or run {BUILD_HINT}")
            self.bm25 = BM25Index.load(corpus / "bm25", {"collection": self.store.collection})

    def embed_and_store_corpus(self, corpus_path: str | Path, embeddings_dir: str | Path | None = None) -> None:
        """Encode a collection (TSV or BEIR JSONL) with this run's bi-encoder, build the HNSW index and the
        passage store, and persist them in the run; resumes from finished embedding shards."""
        corpus_path = Path(corpus_path)
        passages = list(formats.iter_collection(corpus_path))
        if not passages:
            raise ValueError(f"{corpus_path}: no passages")
        collection = file_fingerprint(corpus_path)
        inputs = {"collection": collection, "model": self.model_id}
        corpus = self.run_dir / CORPUS_DIR
        shards = Path(embeddings_dir) if embeddings_dir else corpus / "embeddings"
        encode_collection(self.model, passages, shards, EncodeConfig(**self.record.encode), inputs, replace_stale=True)
        index = DenseIndex.from_shards(shards, IndexConfig(**self.record.index))
        index.save(corpus / "index", inputs)
        PassageStore.build(corpus / "passages.sqlite", passages, collection, total=len(passages))
        if self.serving.first_stage == "hybrid":
            bm25 = BM25Config(**self.record.bm25)  # its expansion path was filled in by the build
            expansions = read_expansions(bm25.expansion, bm25.expansion_keep) if bm25.expansion else None
            BM25Index.build(passages, bm25, expansions).save(corpus / "bm25", {"collection": collection,
                                                                               **expansion_inputs(bm25)})
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
        if self.index is None or self.store is None:
            raise ArtifactError(f"{self.run_dir} has no corpus yet: call embed_and_store_corpus(path) or run "
                                f"{BUILD_HINT}")
        serving = self.serving
        depth = serving.depth if depth is None else depth
        if depth > 0 and self.reranker is None:
            self.reranker = self._load_reranker(serving.variant)
        start = time.perf_counter()
        usable_ms = serving.latency_budget_ms - serving.safety_ms
        deadline = start + usable_ms / 1000.0
        timings: dict[str, float] = {}

        with self._compute.turn(deadline):
            vector = self.model.encode([query], "query", bf16=serving.query_bf16)
        t = _lap(timings, "encode", start)
        wanted = max(k, serving.candidates, depth)  # a depth beyond N widens the first stage: rerank what was asked
        pids, scores = self._first_stage(query, vector, wanted, timings)
        t = time.perf_counter()
        depth = min(depth, len(pids))
        texts = self.store.get_many(pids[: max(depth, k)])
        t = _lap(timings, "fetch", t)

        reranked: list[tuple[str, float]] = []
        cut = False
        position = 0
        while position < depth:
            wanted = min(serving.rerank_batch, depth - position)
            with self._compute.turn(deadline):
                remaining_ms = (deadline - time.perf_counter()) * 1000.0
                size = self.cost.affordable(remaining_ms, wanted)
                cut = size < wanted  # rerank the best candidates that fit, then stop
                if size == 0:
                    if not reranked and remaining_ms > usable_ms / 2:  # not queueing: the estimate is to blame
                        self.cost.relax()
                    break
                batch = pids[position: position + size]
                batch_start = time.perf_counter()
                batch_scores = self.reranker.score(query, [texts[p] for p in batch])
                self.cost.observe((time.perf_counter() - batch_start) * 1000.0 / len(batch))
            reranked.extend(zip(batch, map(float, batch_scores)))
            position += len(batch)
            if cut:
                break
        t = _lap(timings, "rerank", t)

        head = [p for p, _ in reranked]
        reranked = fuse_reranked(serving.fusion, head, scores[: len(head)], [sc for _, sc in reranked],
                                 serving.rerank_weight, serving.fusion_k)
        floor = min((s for _, s in reranked), default=0.0)
        tail = [(p, floor - 1.0 - i * 1e-3 if reranked else float(s))
                for i, (p, s) in enumerate(zip(pids[position:], scores[position:]))]
        ranked = (reranked + tail)[:k]
        missing = [p for p, _ in ranked if p not in texts]
        if missing:
            texts.update(self.store.get_many(missing))
        results = [Result(p, texts.get(p, ""), s) for p, s in ranked]
        timings["total"] = (time.perf_counter() - start) * 1000.0
        return SearchResponse(results, timings, len(reranked), depth, cut)

    def candidates(self, query: str, n: int) -> tuple[list[str], list[float]]:
        """The first stage's top n ids and scores, before any reranking: what benchmarks.sweep reranks offline
        to fit the depth and the reranker weight together."""
        check_query(query, n)
        if self.index is None:
            raise ArtifactError(f"{self.run_dir} has no corpus yet: call embed_and_store_corpus(path) or run "
                                f"{BUILD_HINT}")
        vector = self.model.encode([query], "query", bf16=self.serving.query_bf16)
        return self._first_stage(query, vector, n, {})

    def _first_stage(self, query: str, vector, wanted: int, timings: dict[str, float]) -> tuple[list[str], list[float]]:
        """The top `wanted` candidates and their first-stage scores."""
        t = time.perf_counter()
        scores, pids = self.index.search(vector, wanted)
        scores, pids = [float(s) for s in scores[0]], list(pids[0])
        t = _lap(timings, "ann", t)
        if self.bm25 is None:
            return pids, scores
        if self.serving.fusion == "rrf":
            lexical = [p for p, _ in self.bm25.search_ids([query], wanted)[0]]
            fused = reciprocal_rank_fusion([lexical, pids], self.serving.fusion_k,
                                           [1.0, self.serving.dense_weight])[:wanted]
        else:
            union, dense, bm25 = self.hybrid_features(query, vector, pids, scores, wanted)
            fused = linear_fusion(union, dense, bm25, self.serving.bm25_weight)[:wanted]
        _lap(timings, "bm25", t)
        return [p for p, _ in fused], [s for _, s in fused]

    def hybrid_features(self, query: str, vector, pids: list[str], scores: list[float],
                        k: int) -> tuple[list[str], list[float], list[float]]:
        """The union of the dense candidates (`pids`, `scores`) and BM25's top k, each with both scores: what
        score fusion weighs (`benchmarks.fusion` fits the weight on these). One BM25 scoring pass gives
        both BM25's top k and the scores of the passages only the bi-encoder found."""
        all_bm25 = self.bm25.scores(query)
        bm25 = dict(self.bm25.top_ids(all_bm25, k))
        dense = dict(zip(pids, scores))
        union = list(dict.fromkeys([*pids, *bm25]))
        only_bm25 = [p for p in union if p not in dense]
        dense.update(zip(only_bm25, map(float, self.index.score_ids(vector[0], only_bm25))))
        only_dense = [p for p in union if p not in bm25]
        bm25.update(zip(only_dense, map(float, all_bm25[self.bm25.rows(only_dense)])))
        return union, [dense[p] for p in union], [bm25[p] for p in union]

    def describe(self) -> dict:
        return {"run_dir": str(self.run_dir), "serving": asdict(self.serving), "corpus": self.record.corpus}


def _lap(timings: dict[str, float], name: str, since: float) -> float:
    now = time.perf_counter()
    timings[name] = (now - since) * 1000.0
    return now
