"""Hard negatives: read the official `qid pid` file or our mined `qid pid rank score` files, and write
mined ones, so BM25 mining and the bi-encoder's own mining feed training in one format."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from irbase.artifacts import atomic_path
from irbase.formats import LineErrors, iter_lines


def read_negatives(path: str | os.PathLike, lenient: bool = False) -> dict[str, list[str]]:
    """`qid -> [pid, ...]` in file order (rank order for mined files)."""
    path = Path(path)
    errors = LineErrors(path, lenient)
    negatives: dict[str, list[str]] = {}
    for number, line in iter_lines(path, errors):
        parts = line.split("\t")
        if len(parts) not in (2, 4):
            errors(number, f"expected 2 (qid, pid) or 4 (qid, pid, rank, score) tab-separated columns, "
                           f"found {len(parts)}")
            continue
        negatives.setdefault(parts[0], []).append(parts[1])
    errors.report()
    return negatives


def write_negatives(path: str | os.PathLike, ranked: Iterable[tuple[str, Sequence[tuple[str, float]]]],
                    qrels: Mapping[str, Mapping[str, int]], depth: int) -> int:
    """Write each query's top-`depth` retrieved passages that are not among its positives; rows written."""
    rows = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for qid, hits in ranked:
            positives = {pid for pid, rel in qrels.get(qid, {}).items() if rel > 0}
            negatives = [(pid, score) for pid, score in hits if pid not in positives][:depth]
            for rank, (pid, score) in enumerate(negatives, 1):
                f.write(f"{qid}\t{pid}\t{rank}\t{score:.4f}\n")
            rows += len(negatives)
    return rows
