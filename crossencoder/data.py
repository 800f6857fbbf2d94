"""Cross-encoder batches: per query a group [positive, G-1 hard negatives], all pairs of a micro-batch
in one padded tensor."""
from __future__ import annotations

from typing import Any, Iterator

import torch

from irbase.examples import EpochOrder, TrainExamples

from crossencoder.pairs import PairEncoder


class GroupBatches:
    """The `BatchSource` the shared trainer consumes; `examples.per_query` is G-1."""

    def __init__(self, examples: TrainExamples, batch_size: int, pairs: PairEncoder):
        self.examples, self.pairs = examples, pairs
        self.group_size = examples.per_query + 1
        self.order = EpochOrder(list(examples.queries), batch_size, examples.seed)
        self.all_pids = sorted(examples.passages)

    def micro_batches_per_epoch(self, world_size: int) -> int:
        return self.order.micro_batches_per_epoch(world_size)

    def batches(self, epoch: int, skip: int, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        for qids in self.order.batches(epoch, skip, rank, world_size):
            yield self.collate(qids, epoch)

    def collate(self, qids: list[str], epoch: int) -> dict[str, Any]:
        ex = self.examples
        queries, passages = [], []
        for qid in qids:
            positive, negatives = ex.sample(qid, epoch, self.all_pids)
            for pid in [positive] + negatives:
                queries.append(ex.queries[qid])
                passages.append(ex.passages[pid])
        ids, mask = self.pairs.encode_pairs(queries, passages)
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "group_size": self.group_size, "num_examples": len(qids)}
