"""The bi-encoder over the run's FAISS index (HNSW by default): inner products of normalised embeddings."""
from __future__ import annotations

from typing import Sequence

from irbase.artifacts import ArtifactError, read_manifest
from irbase.components import FirstStage, Query

from biencoder.encode import EncodeConfig, encode_collection
from biencoder.index import KIND as INDEX_KIND, DenseIndex, IndexConfig


class DenseStage(FirstStage):
    needs_vector = True
    timing = "ann"

    def __init__(self, index: DenseIndex):
        self.index = index

    @classmethod
    def build(cls, run, passages: Sequence[tuple[str, str]]) -> None:
        """Encode the collection (resuming from finished shards) and build the index over it."""
        inputs = {"collection": run.collection, "model": run.model_id}
        encode_collection(run.model, passages, run.embeddings_dir, EncodeConfig(**run.record.encode), inputs,
                          replace_stale=True)
        DenseIndex.from_shards(run.embeddings_dir, IndexConfig(**run.record.index)).save(run.corpus / "index",
                                                                                          inputs)

    @classmethod
    def load(cls, run) -> "DenseStage":
        index = DenseIndex.load(run.corpus / "index", {"model": run.model_id}, verify=run.verify)
        indexed = read_manifest(run.corpus / "index", INDEX_KIND)["inputs"].get("collection")
        if indexed != run.store.collection:
            raise ArtifactError(f"{run.corpus}: the passage store holds another collection than the index "
                                f"({run.store.collection[:19]}... vs {str(indexed)[:19]}...); rebuild with "
                                "embed_and_store_corpus or python -m pipeline.build")
        if len(run.store) != index.index.ntotal:
            raise ArtifactError(f"{run.corpus}: {len(run.store)} stored passages but {index.index.ntotal} indexed")
        return cls(index)

    def search(self, query: Query, k: int) -> tuple[list[str], list[float]]:
        scores, pids = self.index.search(query.vector, k)
        return list(pids[0]), [float(s) for s in scores[0]]

    def score(self, query: Query, pids: Sequence[str]) -> list[float]:
        return [float(s) for s in self.index.score_ids(query.vector[0], list(pids))]
