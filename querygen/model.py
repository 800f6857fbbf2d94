"""The query generator: a base LM as a causal LM (passage -> query) whose output head is sliced to the
tokens queries and passages use.

On Gemma-3-270m the 262k-token head costs more per generated token than the 18 layers, and a naive
training step computes logits at every position over that head: slicing it to the ~60k tokens that the
corpus and the queries produce, and taking logits only where the loss is, made a step 3x faster
(`shared/notes/generation-cost.md`). Only the top `train_layers` layers, the final norm and the sliced head
train; the token embeddings and the lower layers stay the base LM's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from irbase.artifacts import atomic_dir, atomic_write_json
from irbase.config import read_saved_config
from irbase.lm import BaseLMConfig, load_backbone, load_tokenizer, save_tokenizer

CONFIG_FILE = "querygen.json"
HEAD_FILE = "head.pt"


@dataclass
class GeneratorConfig:
    base_lm: BaseLMConfig = field(default_factory=BaseLMConfig)
    train_layers: int | None = 6        # the top N layers train (null: all)
    prompt: str = "Passage: {passage}\nQuery:"
    passage_max_tokens: int = 128       # the passage is cut to this many tokens before it enters the prompt
    query_max_tokens: int = 24          # training targets are cut here (EOS kept)

    def __post_init__(self) -> None:
        if "{passage}" not in self.prompt:
            raise ValueError(f"querygen.model.prompt {self.prompt!r} must contain {{passage}}")
        if self.base_lm.bidirectional:
            raise ValueError("querygen.model.base_lm.bidirectional: a generator must attend causally")


class QueryGenerator(nn.Module):
    """Backbone (no LM head) + a head over `vocab` (base-tokenizer ids; sliced id i is vocab[i])."""

    def __init__(self, config: GeneratorConfig, backbone: nn.Module, tokenizer, vocab: torch.Tensor,
                 head: nn.Linear):
        super().__init__()
        self.config, self.backbone, self.tokenizer = config, backbone, tokenizer
        self.register_buffer("vocab", vocab.long(), persistent=False)
        self.head = head
        self.softcap = getattr(backbone.config, "final_logit_softcapping", None)
        self._freeze()

    def _freeze(self) -> None:
        layers = self.backbone.layers
        top = len(layers) if self.config.train_layers is None else self.config.train_layers
        if not 0 <= top <= len(layers):
            raise ValueError(f"querygen.model.train_layers={top}: the backbone has {len(layers)} layers")
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[len(layers) - top:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        for p in self.backbone.norm.parameters():
            p.requires_grad_(True)

    @classmethod
    def from_base(cls, config: GeneratorConfig, vocab: Sequence[int]) -> "QueryGenerator":
        """The base LM with its (tied) output head cut to `vocab`: the head starts as those embedding rows."""
        backbone, tokenizer, _ = load_backbone(config.base_lm)
        ids = torch.as_tensor(sorted(set(int(v) for v in vocab)), dtype=torch.long)
        weight = backbone.get_input_embeddings().weight.detach()[ids].clone()
        head = nn.Linear(weight.shape[1], len(ids), bias=False)
        head.weight.data.copy_(weight)
        return cls(config, backbone, tokenizer, ids, head)

    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device  # the head may be int8 (no .weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.head(hidden)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor,
                num_examples: int | None = None) -> torch.Tensor:
        """Mean cross-entropy over the query tokens: `targets[b, t]` is the sliced id that position t
        predicts, -100 elsewhere; logits are taken only at those positions."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        where = targets != -100
        return F.cross_entropy(self.logits(hidden[where]).float(), targets[where])

    @torch.inference_mode()
    def token_nll(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """(summed negative log-likelihood, token count) of a batch's query tokens."""
        hidden = self.backbone(input_ids=batch["input_ids"].to(self.device),
                               attention_mask=batch["attention_mask"].to(self.device)).last_hidden_state
        targets = batch["targets"].to(self.device)
        where = targets != -100
        loss = F.cross_entropy(self.logits(hidden[where]).float(), targets[where], reduction="sum")
        return float(loss), int(where.sum())

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        with atomic_dir(path) as tmp:
            self.backbone.save_pretrained(tmp / "backbone")
            save_tokenizer(self.tokenizer, tmp / "backbone")
            torch.save({"vocab": self.vocab.cpu(), "weight": self.head.weight.detach().cpu()}, tmp / HEAD_FILE)
            atomic_write_json(tmp / CONFIG_FILE, {"querygen": dataclasses.asdict(self.config), **(extra or {})})

    @classmethod
    def load(cls, path: str | Path) -> "QueryGenerator":
        from transformers import AutoModel

        path = Path(path)
        config, _ = read_saved_config(path, CONFIG_FILE, "querygen", GeneratorConfig, "query generator",
                                      "querygen.train")
        backbone = AutoModel.from_pretrained(path / "backbone", dtype=torch.float32)
        state = torch.load(path / HEAD_FILE, weights_only=True)
        head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0], bias=False)
        head.weight.data.copy_(state["weight"])
        return cls(config, backbone, load_tokenizer(str(path / "backbone")), state["vocab"], head)
