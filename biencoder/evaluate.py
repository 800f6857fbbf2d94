"""Exact-search effectiveness of a bi-encoder on a split: encode the collection (resumable shards),
search every judged query with `IndexFlatIP`, score with the shared metrics."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from irbase.bm25 import BM25Index
from irbase.dataset import Dataset
from irbase.metrics import Evaluation, evaluate

from biencoder.encode import EncodeConfig, encode_collection
from biencoder.index import DenseIndex, IndexConfig
from biencoder.model import BiEncoder


def search_queries(model: BiEncoder, index: DenseIndex, queries: dict[str, str], k: int,
                   dim: int | None = None, bf16: bool = True) -> dict[str, list[tuple[str, float]]]:
    qids = list(queries)
    vectors = model.encode([queries[q] for q in qids], "query", batch_size=128, dim=dim, bf16=bf16)
    scores, pids = index.search(vectors, k)
    return {qid: list(zip(p, map(float, s))) for qid, p, s in zip(qids, pids, scores)}


def evaluate_exact(model: BiEncoder, dataset: Dataset, shard_dir: str | Path, encode: EncodeConfig,
                   inputs: dict[str, str], k: int = 100) -> tuple[Evaluation, DenseIndex]:
    passages = list(dataset.iter_collection())
    encode_collection(model, passages, shard_dir, encode, inputs, replace_stale=True)
    exact = DenseIndex.from_shards(shard_dir, IndexConfig(kind="flat"))
    run = search_queries(model, exact, dataset.queries, k, encode.dim, encode.bf16)
    return evaluate({q: [p for p, _ in hits] for q, hits in run.items()}, dataset.qrels), exact


@dataclass
class ProxyConfig:
    """A cheap, fixed stand-in for the full dev evaluation, to compare recipes in minutes.

    A seeded sample of dev queries is searched over their judged passages, BM25's top passages for each
    (the distractors that fool BM25) and random passages (those that may fool a dense model). Scores run
    higher than on the full collection and favour BM25, whose top results are all present: compare dense
    recipes with each other on it, and confirm a winner on the full split.
    """
    queries: int = 200
    bm25_depth: int = 30
    random_passages: int = 4000


def proxy_corpus(dataset: Dataset, bm25: BM25Index, config: ProxyConfig, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    qids = sorted(dataset.queries)
    qids = [qids[i] for i in sorted(rng.choice(len(qids), min(config.queries, len(qids)), replace=False))]
    pool = {pid for q in qids for pid in dataset.qrels[q]}
    for hits in bm25.search_ids([dataset.queries[q] for q in qids], config.bm25_depth):
        pool.update(pid for pid, _ in hits)
    others = sorted(set(dataset.collection) - pool)
    extra = [others[i] for i in rng.choice(len(others), min(config.random_passages, len(others)), replace=False)]
    return qids, sorted(pool) + extra


def evaluate_proxy(model: BiEncoder, dataset: Dataset, bm25: BM25Index, config: ProxyConfig, seed: int,
                   bf16: bool = True) -> dict[str, float]:
    """Dense and BM25 metrics on the proxy corpus, named `proxy_*` and `proxy_bm25_*`."""
    qids, pids = proxy_corpus(dataset, bm25, config, seed)
    allowed = set(pids)
    collection = dataset.collection
    vectors = model.encode([collection[p] for p in pids], "passage", batch_size=64, bf16=bf16)
    index = DenseIndex.from_embeddings(vectors, pids, IndexConfig(kind="flat"))
    queries = {q: dataset.queries[q] for q in qids}
    qrels = {q: dataset.qrels[q] for q in qids}
    dense = search_queries(model, index, queries, 100, bf16=bf16)
    lexical = bm25.search_ids(list(queries.values()), len(pids))
    result = {f"proxy_{k}": v for k, v in
              evaluate({q: [p for p, _ in dense[q]] for q in qids}, qrels).means.items()}
    result.update({f"proxy_bm25_{k}": v for k, v in evaluate(
        {q: [p for p, _ in hits if p in allowed][:100] for q, hits in zip(qids, lexical)}, qrels).means.items()})
    result["proxy_passages"] = len(pids)
    return result
