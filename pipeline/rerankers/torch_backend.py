"""The trained cross-encoder in torch, unexported: the reference the ONNX variants are checked against, and
a backend for a GPU box without onnxruntime-gpu."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from irbase.artifacts import ArtifactError, model_fingerprint

from crossencoder.model import CrossEncoder
from pipeline.config import BUILD_HINT
from pipeline.context import RunContext


class TorchReranker:
    def __init__(self, model: CrossEncoder, batch_size: int, bf16: bool):
        self.model, self.batch_size, self.bf16 = model.eval(), batch_size, bf16
        self.variant = "torch"

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        return self.model.score(query, list(passages), batch_size=self.batch_size, bf16=self.bf16)


def load_torch(run: RunContext, variant: str) -> TorchReranker:
    """`variant` fp32 or bf16 (autocast, used only where bf16 is fast); refuses another model than the run's."""
    if variant not in ("fp32", "bf16"):
        raise ValueError(f"pipeline.variant {variant!r}: the torch reranker runs fp32 or bf16")
    path = run.run_dir / run.serving.crossencoder / "model"
    if not path.is_dir():
        raise ArtifactError(f"{path} holds no trained cross-encoder: the run is half built. Finish it with: "
                            f"{BUILD_HINT}")
    expected = run.record.fingerprints.get("crossencoder")
    if expected and model_fingerprint(path) != expected:
        raise ArtifactError(f"{path} is not the cross-encoder this run was built with; rebuild with: {BUILD_HINT}")
    return TorchReranker(CrossEncoder.load(path), run.serving.rerank_batch, variant == "bf16")
