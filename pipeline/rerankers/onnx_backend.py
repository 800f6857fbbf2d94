"""The exported cross-encoder (`<crossencoder>/onnx/<variant>`) under onnxruntime: what the pipeline serves."""
from __future__ import annotations

from irbase.artifacts import ArtifactError

from crossencoder.runtime import OnnxReranker
from pipeline.config import BUILD_HINT
from pipeline.context import RunContext


def load_onnx(run: RunContext, variant: str) -> OnnxReranker:
    """Refuses an export of another cross-encoder than the one the run recorded."""
    path = run.run_dir / run.serving.crossencoder / "onnx" / variant
    if not (path / "model.onnx").is_file():
        raise ArtifactError(f"{path} holds no exported cross-encoder: the run is half built. "
                            f"Finish it with: {BUILD_HINT}")
    reranker = OnnxReranker(path, threads=run.serving.threads, batch_size=run.serving.rerank_batch, verify=run.verify)
    expected = run.record.fingerprints.get("crossencoder")
    if expected and reranker.manifest.get("model") != expected:
        raise ArtifactError(f"{path} was exported from another cross-encoder than this run's; "
                            f"rebuild with: {BUILD_HINT}")
    return reranker
