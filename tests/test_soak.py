"""The soak's bookkeeping: windows, memory drift and tail drift against their targets, answers compared."""
from __future__ import annotations

import itertools
import json

import pytest

from irbase.search import Result
from tests.conftest import QUERIES, copy_tiny_run


class Scripted:
    """Answers instantly; fails on one query, so a failure is counted rather than fatal."""

    def search(self, query: str, k: int) -> list[Result]:
        if query == "fail":
            raise ValueError("refused")
        return [Result(query, "", 1.0)]


def test_windows_report_memory_and_tail_drift_and_count_failures():
    from benchmarks.soak import run_windows

    steady = itertools.count()
    result = run_windows(Scripted(), ["a"] * 30, clients=2, window=10, rss=lambda: 100 * 2**20 + next(steady))
    assert [w["queries"] for w in result["windows"]] == [10, 10, 10]
    assert result["errors"] == 0 and abs(result["rss_drift"]) < 1e-6 and result["window"] == 10
    growing = iter([100, 103, 106])  # +6% by the last window: over the 5% target
    leaky = run_windows(Scripted(), ["a"] * 30, clients=1, window=10, rss=lambda: next(growing) * 2**20)
    assert leaky["rss_drift"] == pytest.approx(0.06) and not leaky["met"]
    failing = run_windows(Scripted(), ["a", "fail"] * 5, clients=1, window=5, rss=lambda: 2**20)
    assert failing["errors"] == 5 and not failing["met"] and "refused" in failing["first_errors"][0]


def test_a_soaked_retriever_answers_as_a_fresh_one(tmp_path, built_tiny_run):
    from benchmarks.soak import run_windows, same_answers
    from pipeline import Retriever

    run = copy_tiny_run(built_tiny_run, tmp_path)
    soaked = Retriever(run, latency_budget_ms=60_000)
    texts = list(QUERIES.values())
    result = run_windows(soaked, texts * 10, clients=2, window=len(texts) * 2, rss=lambda: 2**30)
    assert result["errors"] == 0 and len(result["windows"]) == 5
    assert all(w["latency_ms"]["p95"] > 0 for w in result["windows"])
    answers = same_answers(soaked, Retriever(run, latency_budget_ms=60_000), texts)
    assert answers == {"queries": len(texts), "equal": len(texts), "fraction": 1.0, "first_mismatches": []}
    other = Retriever(run, depth=0)  # no reranking: another ranking, which the comparison must notice
    assert same_answers(soaked, other, texts)["equal"] < len(texts)


def test_the_soak_command_serves_the_depth_it_is_given(tmp_path, built_tiny_run, tiny_msmarco):
    """`--depth` reaches the soaked and the fresh Retriever (a run whose sweep chose depth 0 would otherwise
    never exercise its reranker), and the record says which depth was soaked."""
    from benchmarks.soak import main

    run = copy_tiny_run(built_tiny_run, tmp_path)
    config = tmp_path / "soak.yaml"
    config.write_text(f"run: {{dir: {run}, seed: 1}}\ndata: {{root: {tiny_msmarco}}}\n")
    out = tmp_path / "soak"
    for depth in (0, 5):
        main(["--config", str(config), "--queries", "8", "--clients", "1", "--window", "4", "--check", "4",
              "--depth", str(depth), "--out", str(out / str(depth))])
        saved = json.loads((out / str(depth) / "soak.json").read_text())
        assert saved["depth"] == depth and f"Rerank depth {depth}." in (out / str(depth) / "report.md").read_text()
        assert saved["answers"]["equal"] == 4 and saved["runs"][0]["errors"] == 0
    with pytest.raises(SystemExit):
        main(["--config", str(config), "--depth", "-1"])
