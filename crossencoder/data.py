"""Cross-encoder batches: per query a group [positive, G-1 hard negatives], all pairs of a micro-batch
in one padded tensor."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from irbase.examples import ExampleBatches, TrainExamples
from irbase.trec import ScoredRun

from crossencoder.model import group_loss
from crossencoder.pairs import PairEncoder


class FirstStageScores:
    """A first stage's scores for the train queries (a TREC run), as per-pair loss offsets: residual
    training. A passage outside a query's list gets that list's lowest score: it ranked below all of it."""

    def __init__(self, run: ScoredRun, scale: float):
        self.scores = {qid: dict(hits) for qid, hits in run.items() if hits}
        self.floor = {qid: min(scores.values()) for qid, scores in self.scores.items()}
        self.scale = scale

    def offsets(self, qid: str, pids: list[str]) -> list[float]:
        scores, floor = self.scores[qid], self.floor[qid]
        return [self.scale * scores.get(pid, floor) for pid in pids]


SCALE_GRID = (1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0, 40.0, 60.0, 100.0)


def fit_scale(run: ScoredRun, examples: TrainExamples, all_pids: list[str],
              grid: Sequence[float] = SCALE_GRID) -> tuple[float, dict[float, float]]:
    """The scale at which the first stage alone best explains the training groups (least listwise loss
    on epoch 0's samples): the reranker then starts from a calibrated first stage and learns only what it
    misses. Returns the scale and the loss at each grid point."""
    unit = FirstStageScores(run, 1.0)
    groups = []
    for qid in examples.queries:
        positive, negatives = examples.sample(qid, 0, all_pids)
        groups.append(unit.offsets(qid, [positive] + negatives))
    scores = torch.tensor(groups, dtype=torch.float64)
    losses = {float(s): float(group_loss(s * scores.flatten(), scores.shape[1], "listwise")) for s in grid}
    return min(losses, key=losses.get), losses


class GroupBatches(ExampleBatches):
    """`examples.per_query` is G-1."""

    def __init__(self, examples: TrainExamples, batch_size: int, pairs: PairEncoder,
                 first_stage: FirstStageScores | None = None):
        super().__init__(examples, batch_size)
        self.pairs = pairs
        self.group_size = examples.per_query + 1
        self.first_stage = first_stage

    def collate(self, qids: list[str], epoch: int) -> dict[str, Any]:
        ex = self.examples
        queries, passages, offsets = [], [], []
        for qid in qids:
            positive, negatives = ex.sample(qid, epoch, self.all_pids)
            group = [positive] + negatives
            queries.extend([ex.queries[qid]] * len(group))
            passages.extend(ex.passages[pid] for pid in group)
            if self.first_stage is not None:
                offsets.extend(self.first_stage.offsets(qid, group))
        ids, mask = self.pairs.encode_pairs(queries, passages)
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                 "group_size": self.group_size, "num_examples": len(qids)}
        if self.first_stage is not None:
            batch["offsets"] = torch.tensor(offsets, dtype=torch.float32)
        return batch
