"""The config sections every package reads: where the data is and where runs go."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass
class DataConfig:
    root: str = "../shared/data/msmarco-mini"
    train_split: str = "train"
    dev_split: str = "dev"


@dataclass
class RunConfig:
    dir: str = "runs/mini"
    seed: int = 13


def stage_dir(config_path: str | None, overrides: Sequence[str], section: str) -> Path:
    """Where a trained stage lives: <run.dir>/<section.name> (e.g. runs/mini/biencoder-r2)."""
    from irbase.config import load_section, load_yaml

    run = load_section(config_path, "run", RunConfig, overrides)
    name = load_yaml(config_path, overrides).get(section, {}).get("name", section)
    return Path(run.dir) / name


def fill_path(template: str, run_dir: str, data_root: str) -> str:
    """A recipe's path key with `{run_dir}` and `{data_root}` filled in: every path key takes both."""
    return template.format(run_dir=run_dir, data_root=data_root)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
