"""Serving the exported cross-encoder with onnxruntime: tokenization included, no torch needed.

CUDA when onnxruntime-gpu sees a GPU, else the CPU with explicit thread settings. Scores come in
batches of similar-length pairs so padding stays small.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from irbase.artifacts import ArtifactError, read_json, verify_files

from crossencoder.pairs import PairEncoder

EXPORT_FILE = "export.json"


class OnnxReranker:
    def __init__(self, path: str | Path, threads: int | None = None, batch_size: int = 32,
                 use_gpu: bool | None = None, check_manifest: bool = True, verify: bool = True):
        """Load an export, refusing files changed since it was checked against torch (a changed weight
        scores wrongly and silently). With `check_manifest`, sizes are always checked against export.json,
        the sha256 with `verify` (it reads the model: about a second for a 1 GB fp32 export); exports from
        before the records are taken as they are."""
        self.path = Path(path)
        if not (self.path / "model.onnx").is_file():
            raise FileNotFoundError(f"{self.path} has no model.onnx; export one with: "
                                    "python -m crossencoder.export --config configs/mini.yaml")
        self.manifest = {}
        if check_manifest:
            if not (self.path / EXPORT_FILE).is_file():
                raise FileNotFoundError(f"{self.path} has no {EXPORT_FILE}: an interrupted or unchecked export; "
                                        "export again with python -m crossencoder.export")
            self.manifest = read_json(self.path / EXPORT_FILE)
            verify_files(self.path, self.manifest.get("files", {}), verify,
                         hint="export again with python -m crossencoder.export")
        try:
            self.pairs = PairEncoder.from_dir(self.path)
        except Exception as e:  # tokenizers raises a bare Exception naming no file
            raise ArtifactError(f"{self.path}: its tokenizer or pair format does not load ({e}); export again "
                                "with python -m crossencoder.export") from e
        self.batch_size = batch_size
        self.session = _session(self.path / "model.onnx", threads, use_gpu)
        self.provider = self.session.get_providers()[0]
        self.on_gpu = self.provider == "CUDAExecutionProvider"

    @property
    def variant(self) -> str:
        return self.manifest.get("variant", self.path.name)

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """float32 scores, one per passage, in input order."""
        out = np.zeros(len(passages), dtype=np.float32)
        if not passages:
            return out
        order = np.argsort([len(p) for p in passages], kind="stable")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            ids, mask = self.pairs.encode(query, [passages[i] for i in chunk])
            out[chunk] = self.session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
        return out


def _session(model: Path, threads: int | None, use_gpu: bool | None):
    """An onnxruntime session: CUDA when asked or available, else the CPU with explicit thread settings."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    gpu = "CUDAExecutionProvider" in available if use_gpu is None else use_gpu
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    providers = (["CUDAExecutionProvider"] if gpu else []) + ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(model), options, providers=providers)
    except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) share no base
        raise ArtifactError(f"{model}: onnxruntime cannot load it ({e}); export again with "
                            "python -m crossencoder.export") from e
