"""The bi-encoder as a first stage: encode the query, search the FAISS index, return passages."""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from irbase.artifacts import model_fingerprint
from irbase.search import Result, check_query

from biencoder.index import DenseIndex
from biencoder.model import BiEncoder


class DenseRetriever:
    """`search(query, k)` over a trained model and its index; the index must come from this model."""

    def __init__(self, model_dir: str | Path, index_dir: str | Path, passages: dict[str, str],
                 bf16: bool = True, threads: int | None = None):
        self.model = BiEncoder.load(model_dir)
        self.index = DenseIndex.load(index_dir, {"model": model_fingerprint(model_dir)})
        self.passages, self.bf16 = passages, bf16
        self._lock = threading.Lock()  # one forward at a time: torch already uses every core
        if threads:
            torch.set_num_threads(threads)

    def search(self, query: str, k: int) -> list[Result]:
        check_query(query, k)
        with self._lock:
            vector = self.model.encode([query], "query", bf16=self.bf16)
        scores, pids = self.index.search(vector, k)
        return [Result(pid, self.passages.get(pid, ""), float(s)) for pid, s in zip(pids[0], scores[0])]
