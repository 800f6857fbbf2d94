"""Regression against expected scores kept in YAML beside the code (as pyserini does), on the real
mini data when `../shared` is present (it is in CI), and the checker `make report` uses for the rest."""
import pytest

from benchmarks.harness import BenchmarkConfig, run_benchmark
from benchmarks.regression import check, expected_scores, render
from irbase.bm25 import BM25Config, build_or_load
from irbase.dataset import Dataset

from tests.conftest import SHARED_MINI


def test_bm25_mini_dev_matches_expected(tmp_path):
    assert SHARED_MINI.is_dir(), f"{SHARED_MINI} not present (CI has ../shared beside the clone)"
    expected = expected_scores("msmarco-mini", "dev")["bm25"]
    ds = Dataset.from_dir(SHARED_MINI, "dev")
    index = build_or_load(tmp_path / "bm25", ds, BM25Config(**expected["config"]))
    result = run_benchmark(index, ds, BenchmarkConfig(k=100, warmup=0), progress=False)
    rows = check({"bm25": result.evaluation.means}, {"bm25": expected})
    assert len(rows) == len(expected["metrics"]) == 5
    assert all(r.ok for r in rows), render(rows, "msmarco-mini.yaml")


def test_every_reported_system_has_expected_scores():
    systems = expected_scores("msmarco-mini", "dev")
    assert {"bm25", "biencoder", "hybrid", "pipeline", "reference"} <= set(systems)
    for name, spec in systems.items():
        assert 0 < spec["tolerance"] <= 0.05, name
        assert all(0 <= v <= 1 for v in spec["metrics"].values()), name


def test_check_flags_rows_outside_tolerance(tmp_path):
    (tmp_path / "toy.yaml").write_text(
        "dev:\n  systems:\n    a: {tolerance: 0.01, metrics: {recall@1: 0.50, mrr@10: 0.60}}\n"
        "    b: {tolerance: 0.01, metrics: {recall@1: 0.30}}\n")
    expected = expected_scores("toy", "dev", tmp_path)
    rows = check({"a": {"recall@1": 0.505, "mrr@10": 0.62}, "c": {"recall@1": 0.1}}, expected)
    assert [(r.system, r.metric, r.ok) for r in rows] == [("a", "recall@1", True), ("a", "mrr@10", False)]
    assert "**no**" in render(rows, "toy.yaml")
    assert expected_scores("toy", "test", tmp_path) is None and expected_scores("absent", "dev", tmp_path) is None
    (tmp_path / "bad.yaml").write_text("dev:\n  systems: [a]\n")
    with pytest.raises(ValueError, match="bad.yaml: dev.systems"):
        expected_scores("bad", "dev", tmp_path)
