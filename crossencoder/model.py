"""The cross-encoder: a base-LM backbone reading (query, passage) together and a linear scoring head
over one pooled state (the last token for decoders, [CLS] for encoders)."""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from irbase.artifacts import atomic_dir, atomic_write_json
from irbase.config import read_saved_config
from irbase.lm import BaseLMConfig, bf16_fast, by_length, is_decoder, load_backbone

from crossencoder.pairs import PairEncoder, PairFormat

log = logging.getLogger(__name__)
CONFIG_FILE = "crossencoder.json"
POOLINGS = ("auto", "last", "cls", "mean")
LOSSES = ("listwise", "bce")


@dataclass
class CrossEncoderConfig:
    base_lm: BaseLMConfig = field(default_factory=BaseLMConfig)
    pooling: str = "auto"             # auto: last non-pad token for decoders, first ([CLS]) for encoders
    max_length: int = 192             # query + passage + special tokens
    query_max_length: int = 32
    query_prefix: str = "query: "
    passage_prefix: str = " passage: "
    loss: str = "listwise"            # listwise: softmax CE over 1 positive + G-1 negatives; bce: per pair
    freeze_embeddings: bool = True    # the 262k-token embedding matrix is most of Gemma: keep it fixed
    head_lr_scale: float = 10.0       # the head starts from nothing: it learns at this multiple of the LR
    chunk_rows: int | None = 16       # train/score in length-sorted chunks of this many pairs: less padding

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"crossencoder.pooling {self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"crossencoder.loss {self.loss!r}: expected one of {', '.join(LOSSES)}")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    if how == "last":
        last = mask.sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if how == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return hidden[:, 0]


def load_backbone_weights(backbone: nn.Module, tokenizer, path: Path) -> None:
    """The folder must hold the same widths and vocabulary, and at most as many layers: a shallower tower
    fills the first layers (and the embeddings and final norm), so a deeper reranker can warm-start from the
    4-layer bi-encoder tower while its extra layers keep the base LM's weights."""
    from transformers import AutoConfig, AutoModel

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"crossencoder.init_from: {path} is not a Hugging Face model folder (no config.json)")
    saved = AutoConfig.from_pretrained(path)
    ours = backbone.config
    for key in ("hidden_size", "vocab_size"):
        if getattr(saved, key, None) != getattr(ours, key, None):
            raise ValueError(f"crossencoder.init_from: {path} has {key}={getattr(saved, key, None)} but "
                             f"crossencoder.model.base_lm gives {getattr(ours, key, None)}")
    if saved.num_hidden_layers > ours.num_hidden_layers:
        raise ValueError(f"crossencoder.init_from: {path} has num_hidden_layers={saved.num_hidden_layers} but "
                         f"crossencoder.model.base_lm gives {ours.num_hidden_layers}: a tower may be shallower, "
                         "never deeper")
    source = AutoModel.from_pretrained(path, dtype=torch.float32)
    missing, unexpected = backbone.load_state_dict(source.state_dict(), strict=False)

    def beyond_tower(key: str) -> bool:  # "layers.5.mlp..." (Gemma) or "encoder.layer.5...." (BERT)
        found = re.search(r"(?:^|\.)layers?\.(\d+)\.", key)
        return found is not None and int(found.group(1)) >= saved.num_hidden_layers

    stray = [k for k in missing if not beyond_tower(k)] + list(unexpected)
    if stray:
        raise ValueError(f"crossencoder.init_from: {path} does not match the base LM's architecture: {stray[:5]}")
    if saved.num_hidden_layers < ours.num_hidden_layers:
        log.warning("crossencoder.init_from: %s fills layers 0-%d; layers %d-%d keep the base LM's weights", path,
                    saved.num_hidden_layers - 1, saved.num_hidden_layers, ours.num_hidden_layers - 1)


def group_loss(logits: torch.Tensor, group_size: int, kind: str) -> torch.Tensor:
    """Logits of groups laid out [positive, negatives...] one group after another."""
    groups = logits.view(-1, group_size)
    if kind == "listwise":
        return F.cross_entropy(groups.float(), torch.zeros(groups.shape[0], dtype=torch.long, device=logits.device))
    labels = torch.zeros_like(groups, dtype=torch.float32)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(groups.float(), labels)


class CrossEncoder(nn.Module):
    def __init__(self, config: CrossEncoderConfig, backbone: nn.Module, head: nn.Linear, pairs: PairEncoder):
        super().__init__()
        self.config, self.backbone, self.head, self.pairs = config, backbone, head, pairs
        self.decoder = is_decoder(backbone.config)
        self.pooling = config.pooling if config.pooling != "auto" else ("last" if self.decoder else "cls")
        if config.freeze_embeddings:
            backbone.get_input_embeddings().weight.requires_grad_(False)

    @classmethod
    def from_base(cls, config: CrossEncoderConfig, seed: int = 0, init_from: str | Path | None = None
                  ) -> "CrossEncoder":
        """A fresh head on the base LM; `init_from` (a HF folder of a backbone we fine-tuned from the same
        base LM, e.g. the round-2 bi-encoder's tower) replaces the backbone weights."""
        backbone, tokenizer, _ = load_backbone(config.base_lm)
        if init_from is not None:
            load_backbone_weights(backbone, tokenizer, Path(init_from))
        torch.manual_seed(seed)
        head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        fmt = PairFormat.for_tokenizer(tokenizer, is_decoder(backbone.config), query_prefix=config.query_prefix,
                                       passage_prefix=config.passage_prefix, max_length=config.max_length,
                                       query_max_length=config.query_max_length)
        return cls(config, backbone, head, PairEncoder(tokenizer.backend_tokenizer, fmt))

    def param_groups(self, lr: float) -> list[dict]:
        head = list(self.head.parameters())
        ids = {id(p) for p in head}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest, "lr": lr}, {"params": head, "lr": lr * self.config.head_lr_scale}]

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One pass over the padded batch: the graph that ONNX export traces."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(pool(hidden, attention_mask, self.pooling)).squeeze(-1)

    def chunked_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`logits` in length-sorted chunks (`chunk_rows`): the same values for less padded compute."""
        return by_length(self.logits, input_ids, attention_mask, self.config.chunk_rows)

    def forward(self, input_ids, attention_mask, group_size: int, num_examples=None) -> torch.Tensor:
        return group_loss(self.chunked_logits(input_ids, attention_mask), group_size, self.config.loss)

    @torch.inference_mode()
    def score(self, query: str, passages: Sequence[str], batch_size: int = 32, bf16: bool = False) -> np.ndarray:
        """float32 scores of each passage for the query, in input order."""
        self.eval()
        device = next(self.parameters()).device
        bf16 = bf16 and bf16_fast(device)  # emulated bf16 is far slower than fp32
        out = np.zeros(len(passages), dtype=np.float32)
        order = np.argsort([len(p) for p in passages], kind="stable")  # similar lengths share a batch
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            ids, mask = self.pairs.encode(query, [passages[i] for i in chunk])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = self.chunked_logits(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
            out[chunk] = logits.float().cpu().numpy()
        return out

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """HF folder for the backbone, the head, the pair format and tokenizer; all or nothing."""
        with atomic_dir(path) as tmp:
            self.backbone.save_pretrained(tmp / "backbone")
            torch.save(self.head.state_dict(), tmp / "head.pt")
            self.pairs.save(tmp)
            atomic_write_json(tmp / CONFIG_FILE, {"crossencoder": dataclasses.asdict(self.config),
                                                  "decoder": self.decoder, "pooling": self.pooling, **(extra or {})})

    @classmethod
    def load(cls, path: str | Path) -> "CrossEncoder":
        from transformers import AutoModel

        path = Path(path)
        config, _ = read_saved_config(path, CONFIG_FILE, "crossencoder", CrossEncoderConfig, "cross-encoder",
                                      "crossencoder.train")
        backbone = AutoModel.from_pretrained(path / "backbone", dtype=torch.float32)
        head = nn.Linear(backbone.config.hidden_size, 1)
        head.load_state_dict(torch.load(path / "head.pt", weights_only=True))
        return cls(config, backbone, head, PairEncoder.from_dir(path))
