"""TREC run files (`qid Q0 pid rank score tag`), the lingua franca of IR evaluation tools."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from irbase.artifacts import atomic_path
from irbase.formats import LineErrors, iter_lines

ScoredRun = Mapping[str, Sequence[tuple[str, float]]]


def write_trec_run(path: str | os.PathLike, run: ScoredRun, tag: str = "run") -> None:
    """Write ranked `(pid, score)` lists; ranks start at 1 in list order."""
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"run tag {tag!r} must be a non-empty word without spaces")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for qid, ranked in run.items():
            for rank, (pid, score) in enumerate(ranked, 1):
                f.write(f"{qid} Q0 {pid} {rank} {float(score):.6f} {tag}\n")


def read_trec_run(path: str | os.PathLike, lenient: bool = False) -> dict[str, list[tuple[str, float]]]:
    """Read a run back, ordered by rank within each query."""
    path = Path(path)
    errors = LineErrors(path, lenient)
    rows: dict[str, list[tuple[int, str, float]]] = {}
    for number, line in iter_lines(path, errors):
        parts = line.split()
        if len(parts) != 6:
            errors(number, f"expected 6 columns (qid Q0 pid rank score tag), found {len(parts)}")
            continue
        qid, _, pid, rank, score, _ = parts
        try:
            rows.setdefault(qid, []).append((int(rank), pid, float(score)))
        except ValueError:
            errors(number, f"rank {rank!r} or score {score!r} is not a number")
    errors.report()
    return {qid: [(pid, score) for _, pid, score in sorted(r)] for qid, r in rows.items()}
