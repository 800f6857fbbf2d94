"""Regression against expected scores kept in YAML beside the code (as pyserini does), on the real
mini data when `../shared` is present (it is in CI)."""
from pathlib import Path

import pytest
import yaml

from benchmarks.harness import BenchmarkConfig, run_benchmark
from irbase.bm25 import BM25Config, build_or_load
from irbase.dataset import Dataset

from tests.conftest import SHARED_MINI

EXPECTED = Path(__file__).resolve().parents[1] / "benchmarks" / "expected" / "bm25.yaml"


def test_bm25_mini_dev_matches_expected(tmp_path):
    assert SHARED_MINI.is_dir(), f"{SHARED_MINI} not present (CI has ../shared beside the clone)"
    expected = yaml.safe_load(EXPECTED.read_text())["msmarco-mini"]["dev"]
    ds = Dataset.from_dir(SHARED_MINI, "dev")
    index = build_or_load(tmp_path / "bm25", ds, BM25Config(**expected["config"]))
    result = run_benchmark(index, ds, BenchmarkConfig(k=100, warmup=0), progress=False)
    for metric, value in expected["metrics"].items():
        assert result.evaluation.means[metric] == pytest.approx(value, abs=expected["tolerance"]), metric
