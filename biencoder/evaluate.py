"""Exact-search effectiveness of a bi-encoder on a split: encode the collection (resumable shards),
search every judged query with `IndexFlatIP`, score with the shared metrics."""
from __future__ import annotations

from pathlib import Path

import numpy as np

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


def evaluate_sample(model: BiEncoder, dataset: Dataset, size: int, seed: int, bf16: bool = True) -> dict[str, float]:
    """A cheap in-training check: judged passages plus `size` random others, searched exactly.

    Scores are higher than on the full collection; use it to compare steps of one run, not runs.
    """
    rng = np.random.default_rng(seed)
    collection = dataset.collection
    judged = {pid for judged in dataset.qrels.values() for pid in judged}
    others = [p for p in collection if p not in judged]
    chosen = sorted(judged) + [others[i] for i in rng.choice(len(others), min(size, len(others)), replace=False)]
    vectors = model.encode([collection[p] for p in chosen], "passage", batch_size=64, bf16=bf16)
    index = DenseIndex.from_embeddings(vectors, chosen, IndexConfig(kind="flat"))
    run = search_queries(model, index, dataset.queries, 100, bf16=bf16)
    ev = evaluate({q: [p for p, _ in hits] for q, hits in run.items()}, dataset.qrels)
    return {f"sample_{k}": v for k, v in ev.means.items()}
