"""Measured scores against the expected ones kept beside the code (`benchmarks/expected/<dataset>.yaml`):
a regression shows as a row outside its tolerance, not as a number someone has to remember."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

EXPECTED_DIR = Path(__file__).resolve().parent / "expected"


@dataclass
class Check:
    system: str
    metric: str
    expected: float
    measured: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return abs(self.measured - self.expected) <= self.tolerance + 1e-9


def expected_scores(dataset: str, split: str, directory: Path = EXPECTED_DIR) -> dict[str, dict] | None:
    """The `systems` entry of `<directory>/<dataset>.yaml` for `split`, or None when none is recorded."""
    path = directory / f"{dataset}.yaml"
    if not path.is_file():
        return None
    entry = (yaml.safe_load(path.read_text()) or {}).get(split)
    if entry is None:
        return None
    if not isinstance(entry.get("systems"), dict):
        raise ValueError(f"{path}: {split}.systems must map system names to their tolerance and metrics")
    return entry["systems"]


def check(measured: dict[str, dict[str, float]], expected: dict[str, dict]) -> list[Check]:
    """One Check per (system, metric) that both sides have; systems without expected scores are skipped."""
    rows = []
    for system, means in measured.items():
        if system not in expected:
            continue
        spec = expected[system]
        for metric, value in spec["metrics"].items():
            if metric in means:
                rows.append(Check(system, metric, float(value), float(means[metric]), float(spec["tolerance"])))
    return rows


def render(rows: list[Check], source: str) -> str:
    lines = [f"Against the expected scores ({source}):", "",
             "| system | metric | expected | measured | tolerance | within |", "|---|---|---:|---:|---:|---|"]
    lines += [f"| {r.system} | {r.metric} | {r.expected:.4f} | {r.measured:.4f} | {r.tolerance} | "
              f"{'yes' if r.ok else '**no**'} |" for r in rows]
    return "\n".join(lines)
