"""Cross-encoder batches: per query a group [positive, G-1 hard negatives], all pairs of a micro-batch
in one padded tensor."""
from __future__ import annotations

from typing import Any

import torch

from irbase.examples import ExampleBatches, TrainExamples

from crossencoder.pairs import PairEncoder


class GroupBatches(ExampleBatches):
    """`examples.per_query` is G-1."""

    def __init__(self, examples: TrainExamples, batch_size: int, pairs: PairEncoder):
        super().__init__(examples, batch_size)
        self.pairs = pairs
        self.group_size = examples.per_query + 1

    def collate(self, qids: list[str], epoch: int) -> dict[str, Any]:
        ex = self.examples
        queries, passages = [], []
        for qid in qids:
            positive, negatives = ex.sample(qid, epoch, self.all_pids)
            group = [positive] + negatives
            queries.extend([ex.queries[qid]] * len(group))
            passages.extend(ex.passages[pid] for pid in group)
        ids, mask = self.pairs.encode_pairs(queries, passages)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "group_size": self.group_size, "num_examples": len(qids)}
