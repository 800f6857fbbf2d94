"""Uncertainty over queries: a 1,000-query split moves recall@1 by a few points between samples, so
every figure in a report carries a bootstrap interval and every claimed gain a paired test."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class PairedTest:
    difference: float      # mean of (a - b) over the shared queries
    low: float             # 95% bootstrap interval of the difference
    high: float
    p_value: float         # two-sided paired randomization (sign-flip) test
    queries: int


def per_query_values(per_query: Mapping[str, Mapping[str, float]], metric: str,
                     qids: Sequence[str]) -> np.ndarray:
    missing = [q for q in qids if q not in per_query]
    if missing:
        raise KeyError(f"{len(missing)} queries have no {metric} (first: {missing[0]}): compare systems "
                       "on the same query set")
    return np.asarray([per_query[q][metric] for q in qids], dtype=np.float64)


def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean over queries (sample standard deviation / sqrt(n)); 0 for a single value,
    whose noise cannot be measured (a one-query sweep then compares point estimates)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no values for a standard error")
    return float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0


def bootstrap_interval(values: np.ndarray, resamples: int = 2000, seed: int = 13,
                       level: float = 0.95) -> Interval:
    """Percentile bootstrap of the mean, resampling queries with replacement."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    return Interval(float(values.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)))


def paired_test(a: np.ndarray, b: np.ndarray, resamples: int = 10000, seed: int = 13) -> PairedTest:
    """a and b are per-query values of two systems on the same queries, in the same order.

    The p-value randomly swaps each query's two values (flips the sign of its difference): under the
    null hypothesis that the systems are exchangeable, every flip is equally likely."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired values must be two equal-length non-empty vectors, got {a.shape} and {b.shape}")
    diff = a - b
    observed = diff.mean()
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(resamples, diff.size))
    null = (signs * diff).mean(axis=1)
    # +1 in both counts: the observed assignment is one of the permutations (never a p-value of 0)
    p_value = (np.sum(np.abs(null) >= abs(observed) - 1e-12) + 1) / (resamples + 1)
    interval = bootstrap_interval(diff, resamples=min(resamples, 5000), seed=seed)
    return PairedTest(float(observed), interval.low, interval.high, float(p_value), int(diff.size))
