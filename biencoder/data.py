"""Bi-encoder batches: queries, their positives and hard negatives, with every cross-batch false
negative marked so the loss never pushes a query away from one of its own positives."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from irbase.examples import ExampleBatches, TrainExamples


class TrainBatches(ExampleBatches):
    """Shuffled per epoch, sharded over ranks; passage j < B of a batch is query j's positive."""

    def __init__(self, examples: TrainExamples, batch_size: int,
                 tokenize: Callable[[Sequence[str], str], dict[str, torch.Tensor]]):
        super().__init__(examples, batch_size)
        self.tokenize = tokenize

    def collate(self, qids: list[str], epoch: int) -> dict[str, Any]:
        ex = self.examples
        positives, negatives = [], []
        for qid in qids:
            pos, negs = ex.sample(qid, epoch, self.all_pids)
            positives.append(pos)
            negatives.extend(negs)
        pids = positives + negatives  # passage j < B is query j's positive
        false_negatives = torch.zeros(len(qids), len(pids), dtype=torch.bool)
        for i, qid in enumerate(qids):
            relevant = set(ex.positives[qid])
            for j, pid in enumerate(pids):
                if j != i and pid in relevant:
                    false_negatives[i, j] = True
        q = self.tokenize([ex.queries[qid] for qid in qids], "query")
        p = self.tokenize([ex.passages[pid] for pid in pids], "passage")
        return {"query_input_ids": q["input_ids"], "query_attention_mask": q["attention_mask"],
                "passage_input_ids": p["input_ids"], "passage_attention_mask": p["attention_mask"],
                "labels": torch.arange(len(qids)), "false_negatives": false_negatives,
                "num_examples": len(qids)}
