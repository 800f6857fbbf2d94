"""The config sections every package reads: where the data is and where runs go."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    root: str = "../shared/data/msmarco-mini"
    train_split: str = "train"
    dev_split: str = "dev"


@dataclass
class RunConfig:
    dir: str = "runs/mini"
    seed: int = 13
