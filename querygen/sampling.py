"""Batched, seeded query sampling with a KV cache: one prefill per passage, the cache repeated for the
`n` samples (the passage is not prefilled n times), and finished rows dropped from the batch so decode
work shrinks as queries end (decode is about half the time on a CPU)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from querygen.model import QueryGenerator


@dataclass
class SamplingConfig:
    per_passage: int = 3             # queries sampled per passage
    top_k: int = 10                  # sample among the k most likely tokens (0: the whole sliced vocabulary)
    top_p: float | None = None       # nucleus cut after top-k (null: off)
    temperature: float = 1.0
    max_new_tokens: int = 20


def stop_tokens(model: QueryGenerator) -> torch.Tensor:
    """bool over the sliced vocabulary: EOS and every token whose text holds a newline end a query."""
    tokenizer = model.tokenizer
    texts = tokenizer.convert_ids_to_tokens(model.vocab.tolist())
    stop = torch.tensor(["\n" in tokenizer.convert_tokens_to_string([t]) for t in texts], dtype=torch.bool)
    stop |= model.vocab == tokenizer.eos_token_id
    return stop.to(model.device)


def _pick(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One sliced token id per row: greedy when temperature is 0, else seeded top-k / nucleus sampling."""
    if config.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / config.temperature
    if config.top_k:
        values, ids = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1)
    else:
        values, ids = logits.sort(dim=-1, descending=True)
    probs = values.softmax(-1)
    if config.top_p is not None:
        keep = probs.cumsum(-1) - probs < config.top_p   # the first token always stays
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    choice = torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)
    return ids.gather(1, choice).squeeze(1)


@torch.inference_mode()
def sample(model: QueryGenerator, prompts: list[list[int]], config: SamplingConfig,
           generator: torch.Generator | None, stop: torch.Tensor) -> tuple[list[list[int]], int]:
    """Base-tokenizer ids of `per_passage` queries per prompt (prompt-major order), and the tokens decoded."""
    device, n = model.device, config.per_passage
    width = max(len(p) for p in prompts)
    pad = model.tokenizer.pad_token_id or 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model.backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    hidden = out.last_hidden_state[:, -1].repeat_interleave(n, 0)
    mask, position = mask.repeat_interleave(n, 0), positions[:, -1:].repeat_interleave(n, 0)
    alive = torch.arange(len(prompts) * n, device=device)
    tokens: list[list[int]] = [[] for _ in range(len(prompts) * n)]
    decoded = 0
    for step in range(config.max_new_tokens):
        picked = _pick(model.logits(hidden), config, generator)
        decoded += len(picked)
        base = model.vocab[picked]
        ended = stop[picked]
        for row, token, end in zip(alive.tolist(), base.tolist(), ended.tolist()):
            if not end:
                tokens[row].append(token)
        keep = (~ended).nonzero().squeeze(1)
        if len(keep) == 0 or step == config.max_new_tokens - 1:
            break
        if len(keep) < len(alive):
            cache.batch_select_indices(keep)
            alive, mask, position, base = alive[keep], mask[keep], position[keep], base[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        position = position + 1
        out = model.backbone(input_ids=base.unsqueeze(1), attention_mask=mask, position_ids=position,
                             past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1]
    return tokens, decoded
