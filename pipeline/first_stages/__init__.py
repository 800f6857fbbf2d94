"""First stages by name: `pipeline.first_stage` in the recipe (or `Retriever(first_stage=...)`) picks one.
A new first stage is a module with a `FirstStage` subclass (irbase.components) and a line below; code
outside the repository calls `FIRST_STAGES.register(name, cls)` or is named as `package.module:Class`."""
from __future__ import annotations

from irbase.components import FirstStage, Registry

from pipeline.first_stages.bm25 import BM25Stage
from pipeline.first_stages.dense import DenseStage
from pipeline.first_stages.hybrid import HybridStage

FIRST_STAGES: Registry[type[FirstStage]] = Registry("first stage", {
    "dense": DenseStage,     # the bi-encoder over the HNSW index
    "bm25": BM25Stage,       # BM25 (over the passages expanded with generated queries when bm25.expansion is set)
    "hybrid": HybridStage,   # pipeline.hybrid's stages fused by pipeline.fusion
})
