"""InfoNCE over in-batch and hard negatives, with false negatives masked out, summed over Matryoshka
prefix sizes so the embedding can be searched at any of them."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def info_nce(queries: torch.Tensor, passages: torch.Tensor, labels: torch.Tensor,
             false_negatives: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Cross-entropy of each query against every passage in the batch.

    queries [B, d] and passages [P, d] are L2-normalised; labels [B] index each query's positive;
    false_negatives [B, P] marks passages that are positives of the query but not its label (the same
    passage sampled for another query, a duplicate): they are removed from the softmax, never pushed away.
    """
    scores = queries @ passages.T / temperature
    if false_negatives is not None:
        scores = scores.masked_fill(false_negatives, torch.finfo(scores.dtype).min)
    return F.cross_entropy(scores.float(), labels)


def matryoshka_info_nce(queries: torch.Tensor, passages: torch.Tensor, labels: torch.Tensor,
                        false_negatives: torch.Tensor | None, temperature: float,
                        dims: Sequence[int]) -> torch.Tensor:
    """Sum of InfoNCE over the embedding's prefixes (each renormalised); `dims` empty means full size."""
    full = queries.shape[-1]
    total = queries.new_zeros((), dtype=torch.float32)
    for dim in sorted(set(dims) | {full}):
        q = F.normalize(queries[:, :dim], dim=-1)
        p = F.normalize(passages[:, :dim], dim=-1)
        total = total + info_nce(q, p, labels, false_negatives, temperature)
    return total
