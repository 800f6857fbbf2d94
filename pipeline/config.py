"""What a built run serves with, kept in <run>/pipeline.json: written by `pipeline.build`, its BM25 weight
rewritten by `tuning.fusion` and its depth, variant and reranker weight by `tuning.sweep`, read by
`Retriever()`."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from irbase.artifacts import ArtifactError, atomic_write_json
from irbase.config import from_dict

RUN_FILE = "pipeline.json"
RUN_ENV = "MSMARCO_RERANK_RUN"
BUILD_HINT = "python -m pipeline.build --config configs/mini.yaml"
FUSIONS = ("rrf", "score")


@dataclass
class ServingConfig:
    """configs/mini.yaml's `pipeline` section documents each value; these defaults are the same."""
    biencoder: str = "biencoder-r2"   # stage (subdirectory of the run) whose model encodes queries and corpus
    crossencoder: str = "crossencoder"
    reranker: str = "onnx"            # a name in pipeline.rerankers.RERANKERS: onnx | torch
    variant: str = "int8"             # onnx: fp32 | int8 | fp16 (GPU); torch: fp32 | bf16
    candidates: int = 100             # first-stage depth N (widened to the rerank depth when that is larger)
    first_stage: str = "hybrid"       # a name in pipeline.first_stages.FIRST_STAGES: dense | bm25 | hybrid
    hybrid: list[str] = field(default_factory=lambda: ["dense", "bm25"])   # what `hybrid` fuses, first first
    fusion: str = "score"             # score: by weighted scores (tuning.fusion); rrf: by reciprocal rank
    fusion_k: int = 10                # rrf: the constant (tuned on dev-large: 10 beats 60 at the top ranks)
    dense_weight: float = 0.9         # rrf: the first stage's weight, the others' is 1: ties go to them
    bm25_weight: float = 0.05         # score: first stage's score + bm25_weight x each other's
    depth: int = 10                   # candidates reranked (chosen by tuning.sweep)
    latency_budget_ms: float = 1000.0
    safety_ms: float = 100.0          # kept free for what follows the last rerank batch
    # How much the reranker counts against the first stage. rrf: the weight of its rank; score: of its
    # per-query z-scored score added to the first-stage score. null: the reranker's order alone.
    rerank_weight: float | None = 0.07
    rerank_batch: int = 10            # pairs per reranker call; the deadline is checked between calls
    threads: int | None = None        # torch and onnxruntime threads (None: all cores)
    query_bf16: bool = True

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"pipeline.fusion {self.fusion!r}: expected one of {', '.join(FUSIONS)}")


@dataclass
class RunRecord:
    serving: ServingConfig = field(default_factory=ServingConfig)
    fingerprints: dict[str, str] = field(default_factory=dict)   # biencoder/crossencoder model ids at build
    encode: dict[str, Any] = field(default_factory=dict)         # EncodeConfig for embed_and_store_corpus
    index: dict[str, Any] = field(default_factory=dict)          # IndexConfig
    bm25: dict[str, Any] = field(default_factory=dict)           # BM25Config of the hybrid first stage
    corpus: dict[str, Any] | None = None                         # {"collection": fingerprint, "path": ...}
    sweep: dict[str, Any] | None = None                          # the choice tuning.sweep made and why
    fusion_fit: dict[str, Any] | None = None                     # the weights tuning.fusion fitted and why

    def save(self, run_dir: str | Path) -> None:
        atomic_write_json(Path(run_dir) / RUN_FILE, asdict(self))

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunRecord":
        path = Path(run_dir) / RUN_FILE
        if not path.is_file():
            state = "does not exist" if not Path(run_dir).exists() else f"is not a built run (no {RUN_FILE})"
            raise ArtifactError(f"run directory {run_dir} {state}. Build it with: {BUILD_HINT}")
        return from_dict(cls, json.loads(path.read_text(encoding="utf-8")), str(path))


def default_run_dir() -> Path:
    """$MSMARCO_RERANK_RUN, else runs/mini under the working directory, else under the repository."""
    if os.environ.get(RUN_ENV):
        return Path(os.environ[RUN_ENV])
    local = Path("runs/mini")
    return local if local.is_dir() else Path(__file__).resolve().parents[1] / "runs" / "mini"
