"""Rerankers by name: `pipeline.reranker` in the recipe picks one, `pipeline.variant` its precision. A
factory takes the run context and the variant and returns something with `score(query, passages)`
(irbase.components.Reranker). A new backend is a module with a factory and a line below."""
from __future__ import annotations

from typing import Callable

from irbase.components import Reranker, Registry

from pipeline.context import RunContext
from pipeline.rerankers.onnx_backend import load_onnx
from pipeline.rerankers.torch_backend import load_torch

RERANKERS: Registry[Callable[[RunContext, str], Reranker]] = Registry("reranker", {
    "onnx": load_onnx,     # the exported cross-encoder under onnxruntime: fp32, int8, fp16 (GPU)
    "torch": load_torch,   # the trained cross-encoder itself (fp32; bf16 autocast where it is fast)
})
