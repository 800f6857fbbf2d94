"""The bi-encoder: a base-LM backbone (shared or per tower), pooling, an optional projection, and
L2-normalised embeddings whose prefixes are usable on their own (Matryoshka)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from irbase.artifacts import atomic_dir, atomic_write_json
from irbase.config import read_saved_config
from irbase.lm import (BaseLMConfig, bf16_fast, by_length, is_decoder, load_backbone, load_tokenizer,
                       save_tokenizer)

from biencoder.loss import matryoshka_info_nce

POOLINGS = ("mean", "last", "cls")
CONFIG_FILE = "biencoder.json"


@dataclass
class BiEncoderConfig:
    base_lm: BaseLMConfig = field(default_factory=BaseLMConfig)
    shared_towers: bool = True
    pooling: str = "mean"               # mean | last (last non-pad token, decoders) | cls
    projection_dim: int | None = None   # linear head on top of the pooled state
    matryoshka_dims: list[int] = field(default_factory=list)  # extra prefix sizes trained (and searchable)
    query_prefix: str = "query: "
    passage_prefix: str = "passage: "
    query_max_length: int = 32
    passage_max_length: int = 160
    temperature: float = 0.05
    freeze_embeddings: bool = True      # the 262k-token embedding matrix is most of Gemma: keep it fixed
    chunk_rows: int | None = 16         # forward in length-sorted chunks of this many texts: same output, less padding

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"biencoder.pooling {self.pooling!r}: expected one of {', '.join(POOLINGS)}")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool [B, T, H] states under a right-padded attention mask [B, T]."""
    if how == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    if how == "last":
        last = mask.sum(1).long() - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return hidden[:, 0]


class BiEncoder(nn.Module):
    def __init__(self, config: BiEncoderConfig, query_backbone: nn.Module, passage_backbone: nn.Module | None,
                 tokenizer, projection: nn.Linear | None = None):
        super().__init__()
        self.config = config
        self.query_backbone = query_backbone
        self.passage_backbone = passage_backbone  # None: shared towers
        self.tokenizer = tokenizer
        self.projection = projection
        if config.freeze_embeddings:
            for backbone in self.backbones():
                backbone.get_input_embeddings().weight.requires_grad_(False)

    @classmethod
    def from_base(cls, config: BiEncoderConfig, seed: int = 0) -> "BiEncoder":
        """A fresh model from the base LM; the projection (if any) is seeded."""
        backbone, tokenizer, _ = load_backbone(config.base_lm)
        passage = None
        if not config.shared_towers:
            passage, _, _ = load_backbone(config.base_lm)
        projection = None
        if config.projection_dim:
            torch.manual_seed(seed)
            projection = nn.Linear(backbone.config.hidden_size, config.projection_dim)
        return cls(config, backbone, passage, tokenizer, projection)

    def backbones(self) -> list[nn.Module]:
        return [self.query_backbone] + ([self.passage_backbone] if self.passage_backbone is not None else [])

    @property
    def dim(self) -> int:
        return self.config.projection_dim or self.query_backbone.config.hidden_size

    def tokenize(self, texts: Sequence[str], kind: str) -> dict[str, torch.Tensor]:
        prefix = self.config.query_prefix if kind == "query" else self.config.passage_prefix
        max_length = self.config.query_max_length if kind == "query" else self.config.passage_max_length
        return self.tokenizer([prefix + t for t in texts], max_length=max_length, truncation=True,
                              padding=True, return_tensors="pt")

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, kind: str) -> torch.Tensor:
        """Unnormalised pooled (and projected) embeddings; normalise after any prefix cut."""
        backbone = self.passage_backbone if kind == "passage" and self.passage_backbone is not None \
            else self.query_backbone
        def pooled(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return pool(backbone(input_ids=ids, attention_mask=mask).last_hidden_state, mask, self.config.pooling)

        out = by_length(pooled, input_ids, attention_mask, self.config.chunk_rows)
        return self.projection(out) if self.projection is not None else out

    def forward(self, query_input_ids, query_attention_mask, passage_input_ids, passage_attention_mask,
                labels, false_negatives=None, num_examples=None) -> torch.Tensor:
        queries = self.embed(query_input_ids, query_attention_mask, "query")
        passages = self.embed(passage_input_ids, passage_attention_mask, "passage")
        return matryoshka_info_nce(queries, passages, labels, false_negatives, self.config.temperature,
                                   self.config.matryoshka_dims)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], kind: str, batch_size: int = 64, dim: int | None = None,
               bf16: bool = False) -> np.ndarray:
        """float32 [n, dim] L2-normalised embeddings, in input order."""
        self.eval()
        device = next(self.parameters()).device
        bf16 = bf16 and bf16_fast(device)  # emulated bf16 is far slower than fp32
        out = []
        for start in range(0, len(texts), batch_size):
            batch = {k: v.to(device) for k, v in self.tokenize(texts[start:start + batch_size], kind).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                emb = self.embed(batch["input_ids"], batch["attention_mask"], kind)
            emb = emb.float()[:, : dim or emb.shape[-1]]
            out.append(F.normalize(emb, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, dim or self.dim), dtype=np.float32)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """An HF folder per tower plus our config, written as a whole or not at all."""
        with atomic_dir(path) as tmp:
            self.query_backbone.save_pretrained(tmp / "query")
            if self.passage_backbone is not None:
                self.passage_backbone.save_pretrained(tmp / "passage")
            save_tokenizer(self.tokenizer, tmp / "query")
            if self.projection is not None:
                torch.save(self.projection.state_dict(), tmp / "projection.pt")
            atomic_write_json(tmp / CONFIG_FILE, {"biencoder": dataclasses.asdict(self.config),
                                                  "decoder": is_decoder(self.query_backbone.config),
                                                  **(extra or {})})

    @classmethod
    def load(cls, path: str | Path) -> "BiEncoder":
        from transformers import AutoModel

        path = Path(path)
        config, saved = read_saved_config(path, CONFIG_FILE, "biencoder", BiEncoderConfig, "bi-encoder",
                                          "biencoder.train")
        query = AutoModel.from_pretrained(path / "query", dtype=torch.float32)
        passage = AutoModel.from_pretrained(path / "passage", dtype=torch.float32) \
            if (path / "passage").is_dir() else None
        projection = None
        if config.projection_dim:
            projection = nn.Linear(query.config.hidden_size, config.projection_dim)
            projection.load_state_dict(torch.load(path / "projection.pt", weights_only=True))
        return cls(config, query, passage, load_tokenizer(str(path / "query")), projection)
