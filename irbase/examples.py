"""Training examples both trained stages share: each train query with its positives and a pool of
mined hard negatives, sampled as a pure function of (seed, epoch, qid) so a resumed run rebuilds exactly
the same batches."""
from __future__ import annotations

import hashlib
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from irbase.formats import Qrels
from irbase.negatives import read_negatives
from irbase.runconfig import fill_path


@dataclass
class NegativesConfig:
    files: list[str] = field(default_factory=list)  # mined (qid pid rank score) or official (qid pid) files
    per_query: int = 1          # K hard negatives per query
    depth: int = 30             # sample from each file's top-`depth` for a query
    skip_top: int = 0           # skip the top mined ranks (likely unjudged positives)


@dataclass
class SyntheticConfig:
    """Generated queries mixed into the real training queries (a split in the MS MARCO layout, such as
    `python -m querygen.filter` writes)."""
    queries: str | None = None      # queries file ({run_dir}, {data_root}); null: real queries only
    qrels: str | None = None        # its qrels: each query's source passage
    real_share: float = 0.25        # share of real queries among all training queries; 0: synthetic only
                                    # (a first round before the real queries, as GPL orders them)

    def __post_init__(self) -> None:
        if not 0 <= self.real_share <= 1:
            raise ValueError(f"synthetic.real_share={self.real_share}: expected a share in [0, 1]")
        if self.real_share == 0 and self.queries is None:
            raise ValueError("synthetic.real_share=0 trains on synthetic queries only: set synthetic.queries")
        if (self.queries is None) != (self.qrels is None):
            raise ValueError("synthetic.queries and synthetic.qrels: give both or neither")


def with_synthetic(queries: dict[str, str], qrels: Qrels, config: SyntheticConfig, run_dir: str, data_root: str,
                   seed: int) -> tuple[dict[str, str], Qrels, int]:
    """Real queries and qrels plus a seeded sample of synthetic ones sized so that real queries make up
    `real_share` of the judged queries (all synthetic ones and no real ones at 0); also returns how many
    synthetic queries were added."""
    from irbase.formats import read_qrels, read_queries

    if config.queries is None:
        return queries, qrels, 0
    synthetic = read_queries(fill_path(config.queries, run_dir, data_root))
    judged = read_qrels(fill_path(config.qrels, run_dir, data_root))
    clash = sorted(set(synthetic) & set(queries))
    if clash:
        raise ValueError(f"synthetic.queries {config.queries}: query ids {', '.join(clash[:3])} are also real ones")
    pool = sorted(q for q in judged if q in synthetic)
    if config.real_share == 0:
        return {q: synthetic[q] for q in pool}, {q: judged[q] for q in pool}, len(pool)
    real = sum(1 for q in qrels if q in queries)
    wanted = min(len(pool), round(real * (1 - config.real_share) / config.real_share))
    chosen = sorted(random.Random(seed).sample(pool, wanted))
    return ({**queries, **{q: synthetic[q] for q in chosen}}, {**qrels, **{q: judged[q] for q in chosen}},
            len(chosen))


def _rng(seed: int, epoch: int, key: str) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}:{epoch}:{key}".encode()))


@dataclass
class TrainExamples:
    queries: dict[str, str]
    positives: dict[str, list[str]]     # qid -> relevant pids
    negatives: dict[str, list[str]]     # qid -> candidate hard negatives (positives already removed)
    passages: dict[str, str]
    per_query: int = 1
    seed: int = 13

    @classmethod
    def build(cls, queries: dict[str, str], qrels: Qrels, passages: dict[str, str],
              negative_lists: Sequence[dict[str, list[str]]], config: NegativesConfig, seed: int,
              max_queries: int | None = None) -> "TrainExamples":
        positives = {qid: sorted(p for p, rel in judged.items() if rel > 0 and p in passages)
                     for qid, judged in qrels.items() if qid in queries}
        positives = {qid: pids for qid, pids in positives.items() if pids}
        qids = sorted(positives)
        if max_queries is not None:
            qids = sorted(random.Random(seed).sample(qids, min(max_queries, len(qids))))
        negatives: dict[str, list[str]] = {}
        for qid in qids:
            pool: list[str] = []
            for lists in negative_lists:
                pool.extend(lists.get(qid, [])[config.skip_top: config.depth])
            excluded = set(positives[qid])
            negatives[qid] = [p for p in dict.fromkeys(pool) if p not in excluded and p in passages]
        return cls({q: queries[q] for q in qids}, {q: positives[q] for q in qids}, negatives, passages,
                   config.per_query, seed)

    def __len__(self) -> int:
        return len(self.queries)

    def sample(self, qid: str, epoch: int, all_pids: list[str]) -> tuple[str, list[str]]:
        """One positive and `per_query` negatives; random passages fill in when mined ones run short."""
        rng = _rng(self.seed, epoch, qid)
        positive = rng.choice(self.positives[qid])
        pool = self.negatives.get(qid, [])
        chosen = rng.sample(pool, min(self.per_query, len(pool)))
        excluded = set(self.positives[qid]) | set(chosen)
        while len(chosen) < self.per_query:
            pid = rng.choice(all_pids)
            if pid not in excluded:
                chosen.append(pid)
                excluded.add(pid)
        return positive, chosen


def load_negative_lists(files: Sequence[str], run_dir: str, data_root: str, key: str) -> list[dict[str, list[str]]]:
    """Read each negatives file; `{run_dir}` and `{data_root}` in a path are filled in."""
    lists = []
    for name in files:
        path = Path(fill_path(name, run_dir, data_root))
        if not path.is_file():
            raise FileNotFoundError(f"{key}: {path} not found (BM25 negatives: `python -m irbase.bm25 mine`; "
                                    "the bi-encoder's: `python -m biencoder.mine`)")
        lists.append(read_negatives(path))
    return lists


class EpochOrder:
    """Shuffled query order per epoch, cut into micro-batches and sharded over ranks."""

    def __init__(self, qids: Sequence[str], batch_size: int, seed: int):
        self.qids, self.batch_size, self.seed = sorted(qids), batch_size, seed

    def micro_batches_per_epoch(self, world_size: int) -> int:
        return len(self.qids) // (self.batch_size * world_size)

    def order(self, epoch: int) -> list[str]:
        order = list(self.qids)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def batches(self, epoch: int, skip: int, rank: int, world_size: int) -> Iterator[list[str]]:
        order = self.order(epoch)
        for index in range(skip, self.micro_batches_per_epoch(world_size)):
            global_index = index * world_size + rank
            yield order[global_index * self.batch_size:(global_index + 1) * self.batch_size]


def stream_fingerprint(examples: TrainExamples, batch_size: int) -> str:
    """What fixes the order of a training run's query stream (its queries, seed and batch size): a run that
    continues another's stream must be drawing from the same one."""
    digest = hashlib.sha256(f"{examples.seed}:{batch_size}\n".encode())
    for qid in examples.queries:
        digest.update(f"{qid}\n".encode())
    return digest.hexdigest()[:16]


class ExampleBatches:
    """A `BatchSource` for the shared trainer over `TrainExamples`; subclasses say how a micro-batch of
    query ids becomes model inputs."""

    def __init__(self, examples: TrainExamples, batch_size: int):
        self.examples = examples
        self.order = EpochOrder(list(examples.queries), batch_size, examples.seed)
        self.all_pids = sorted(examples.passages)

    def micro_batches_per_epoch(self, world_size: int) -> int:
        return self.order.micro_batches_per_epoch(world_size)

    def batches(self, epoch: int, skip: int, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        for qids in self.order.batches(epoch, skip, rank, world_size):
            yield self.collate(qids, epoch)

    def collate(self, qids: list[str], epoch: int) -> dict[str, Any]:
        raise NotImplementedError
