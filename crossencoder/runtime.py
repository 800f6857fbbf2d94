"""Serving the exported cross-encoder with onnxruntime: tokenization included, no torch needed.

CUDA when onnxruntime-gpu sees a GPU, else the CPU with explicit thread settings. Scores come in
batches of similar-length pairs so padding stays small.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from crossencoder.pairs import PairEncoder

EXPORT_FILE = "export.json"


class OnnxReranker:
    def __init__(self, path: str | Path, threads: int | None = None, batch_size: int = 32,
                 use_gpu: bool | None = None, check_manifest: bool = True):
        import onnxruntime as ort

        self.path = Path(path)
        if not (self.path / "model.onnx").is_file():
            raise FileNotFoundError(f"{self.path} has no model.onnx; export one with: "
                                    "python -m crossencoder.export --config configs/mini.yaml")
        self.manifest = {}
        if check_manifest:
            if not (self.path / EXPORT_FILE).is_file():
                raise FileNotFoundError(f"{self.path} has no {EXPORT_FILE}: an interrupted or unchecked export; "
                                        "export again with python -m crossencoder.export")
            self.manifest = json.loads((self.path / EXPORT_FILE).read_text(encoding="utf-8"))
        self.pairs = PairEncoder.from_dir(self.path)
        self.batch_size = batch_size
        available = ort.get_available_providers()
        gpu = "CUDAExecutionProvider" in available if use_gpu is None else use_gpu
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        providers = (["CUDAExecutionProvider"] if gpu else []) + ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self.path / "model.onnx"), options, providers=providers)
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
