"""FAISS index over the passage embeddings: HNSW (inner product) for serving, exact `IndexFlatIP` for
small corpora, for mining and for measuring HNSW recall against exact search.

    python -m biencoder.index --config configs/mini.yaml [--embeddings DIR] [--out DIR]

The index is written atomically with the passage ids and a manifest naming the embeddings it came from,
and memory-mapped at load.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from irbase.artifacts import (ArtifactError, atomic_dir, atomic_write_json, check_inputs, read_manifest, verify_files,
                              write_manifest)
from irbase.config import add_config_args, load_section
from irbase.runconfig import stage_dir
from irbase.search import RowLookup

from biencoder.encode import iter_shards

log = logging.getLogger(__name__)
KIND = "faiss"
HINT = "python -m biencoder.index --config configs/mini.yaml"
PAYLOAD = ("index.faiss", "pids.npy")


@dataclass
class IndexConfig:
    kind: str = "hnsw"           # hnsw | flat (exact)
    m: int = 32                  # HNSW graph degree
    ef_construction: int = 200
    ef_search: int = 512
    sq8: bool = False            # 8-bit scalar quantisation of the stored vectors (4x smaller)
    gpu: bool = True             # exact search on GPUs when faiss-gpu sees one


def new_index(dim: int, config: IndexConfig) -> faiss.Index:
    if config.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if config.kind != "hnsw":
        raise ValueError(f"index.kind {config.kind!r}: expected hnsw or flat")
    # Built directly: index_factory drops METRIC_INNER_PRODUCT for HNSW in some FAISS versions.
    if config.sq8:
        index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_8bit, config.m, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexHNSWFlat(dim, config.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = config.ef_construction
    index.hnsw.efSearch = config.ef_search
    return index


def maybe_gpu(index: faiss.Index, config: IndexConfig) -> faiss.Index:
    """Flat indexes move to all visible GPUs (HNSW has no GPU implementation in FAISS)."""
    if config.gpu and isinstance(index, faiss.IndexFlat) and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        return faiss.index_cpu_to_all_gpus(index)
    return index


class DenseIndex:
    def __init__(self, index: faiss.Index, pids: np.ndarray, config: IndexConfig):
        self.index, self.pids, self.config = index, pids, config
        self._rows = RowLookup(pids, "index")
        self._searcher = maybe_gpu(index, config)  # moved once, not on every query

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, pids: Sequence[str], config: IndexConfig) -> "DenseIndex":
        index = new_index(embeddings.shape[1], config)
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        if config.sq8 and config.kind == "hnsw":
            index.train(vectors)
        index.add(vectors)
        return cls(index, np.asarray(pids), config)

    @classmethod
    def from_shards(cls, shard_dir: str | Path, config: IndexConfig, verify: bool = True) -> "DenseIndex":
        ids, vectors = zip(*((i, np.asarray(v, dtype=np.float32)) for i, v in iter_shards(shard_dir, verify)))
        return cls.from_embeddings(np.concatenate(vectors), np.concatenate(ids), config)

    def search(self, queries: np.ndarray, k: int) -> tuple[list[np.ndarray], list[list[str]]]:
        """Per query, scores and passage ids by descending score; k >= the corpus returns all of it."""
        k = min(k, len(self.pids))
        searcher = self._searcher
        if k == len(self.pids) and isinstance(self.index, faiss.IndexHNSW):
            searcher = faiss.downcast_index(self.index.storage)  # a graph walk may miss some: go exhaustive
        scores, rows = searcher.search(np.ascontiguousarray(queries, np.float32), k)
        keep = rows >= 0
        return ([s[m] for s, m in zip(scores, keep)],
                [[str(self.pids[r]) for r in row[m]] for row, m in zip(rows, keep)])

    def score_ids(self, query: np.ndarray, pids: Sequence[str]) -> np.ndarray:
        """Inner products of one query vector with these passages' stored vectors (decoded, under SQ8):
        score fusion needs a score for candidates only BM25 found."""
        rows = self._rows(pids)
        if not len(rows):
            return np.zeros(0, dtype=np.float32)
        return self.index.reconstruct_batch(rows) @ np.asarray(query, np.float32).reshape(-1)

    def save(self, path: str | Path, inputs: dict[str, str]) -> None:
        with atomic_dir(path) as tmp:
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            np.save(tmp / "pids.npy", self.pids)
            write_manifest(tmp, KIND, {**asdict(self.config), "dim": self.index.d, "count": self.index.ntotal},
                           inputs, files=PAYLOAD)

    @classmethod
    def load(cls, path: str | Path, expected_inputs: dict[str, str] | None = None,
             verify: bool = True) -> "DenseIndex":
        """Memory-map a saved index, refusing one whose files changed since the save: a damaged HNSW graph
        can crash FAISS, and damaged vectors give wrong answers. Sizes are always checked, the sha256 with
        `verify` (it reads the whole index: seconds per GB; manifests older than the checksums have none)."""
        path = Path(path)
        manifest = read_manifest(path, KIND, hint=HINT)
        if expected_inputs:
            check_inputs(path, manifest, expected_inputs)
        verify_files(path, manifest.get("files", {}), verify, hint=f"rebuild it with: {HINT}")
        try:
            index = faiss.read_index(str(path / "index.faiss"), faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError as e:  # FAISS names neither the file nor the cause a reader can act on
            raise ArtifactError(f"{path / 'index.faiss'} is damaged ({e}); rebuild it with: {HINT}") from e
        try:
            pids = np.load(path / "pids.npy", mmap_mode="r")
        except (ValueError, OSError) as e:
            raise ArtifactError(f"{path / 'pids.npy'} is damaged ({e}); rebuild it with: {HINT}") from e
        count = manifest["config"].get("count", index.ntotal)
        if not index.ntotal == len(pids) == count:
            raise ArtifactError(f"{path}: {index.ntotal} vectors in index.faiss, {len(pids)} ids in pids.npy, "
                                f"{count} recorded; rebuild it with: {HINT}")
        saved = {k: v for k, v in manifest["config"].items() if k in IndexConfig.__dataclass_fields__}
        return cls(index, pids, IndexConfig(**saved))


def recall_against_exact(approx: DenseIndex, exact: DenseIndex, queries: np.ndarray, k: int = 100) -> float:
    """The share of exact top-k neighbours that the approximate index also returns."""
    _, a = approx.search(queries, k)
    _, e = exact.search(queries, k)
    return float(np.mean([len(set(x) & set(y)) / max(1, len(y)) for x, y in zip(a, e)]))


def measure_recall(index: DenseIndex, shards: Path, model_dir: Path, queries: list[str], k: int = 100) -> float:
    """HNSW recall@k against exact search, on real query embeddings from the model that made the shards."""
    from biencoder.model import BiEncoder

    vectors = BiEncoder.load(model_dir).encode(queries, "query", batch_size=128, bf16=True)
    return recall_against_exact(index, DenseIndex.from_shards(shards, IndexConfig(kind="flat")), vectors, k)


def main(argv: Sequence[str] | None = None) -> int:
    from irbase.dataset import Dataset
    from irbase.runconfig import DataConfig

    parser = argparse.ArgumentParser(prog="python -m biencoder.index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="bi-encoder run (default: <run.dir>/<biencoder.name>)")
    parser.add_argument("--embeddings", help="shard directory (default: <run>/embeddings)")
    parser.add_argument("--out", help="index directory (default: <run>/index)")
    parser.add_argument("--no-recall", action="store_true", help="skip measuring HNSW recall against exact")
    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = load_section(args.config, "data", DataConfig, args.overrides)
    config = load_section(args.config, "index", IndexConfig, args.overrides)
    base = Path(args.run or stage_dir(args.config, args.overrides, "biencoder"))
    shards = Path(args.embeddings or base / "embeddings")
    out = Path(args.out or base / "index")
    start = time.perf_counter()
    index = DenseIndex.from_shards(shards, config)
    seconds = time.perf_counter() - start
    stats = {"build_seconds": seconds}
    if config.kind == "hnsw" and not args.no_recall and (base / "model").is_dir():
        queries = list(Dataset.from_dir(data.root, data.dev_split).queries.values())
        stats["recall@100_vs_exact"] = measure_recall(index, shards, base / "model", queries)
        stats["ef_search"] = config.ef_search
    index.save(out, read_manifest(shards, "embeddings")["inputs"])
    atomic_write_json(out / "build.json", stats)
    print(f"{config.kind} index of {index.index.ntotal} vectors (dim {index.index.d}) -> {out} in {seconds:.1f} s"
          + (f"; recall@100 against exact {stats['recall@100_vs_exact']:.4f} at efSearch {config.ef_search}"
             if "recall@100_vs_exact" in stats else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
