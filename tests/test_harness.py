import json
import time

import pytest

from benchmarks.harness import BenchmarkConfig, latency_summary, run_benchmark
from benchmarks.report import write_outputs
from benchmarks.run import main as run_main
from irbase.dataset import Dataset
from irbase.search import Result
from irbase.trec import read_trec_run


class Oracle:
    """Returns the judged passage first for half the queries: recall@1 must come out at 0.5."""

    def __init__(self, qrels, queries):
        self.answer = {text: next(iter(qrels[qid])) for qid, text in queries.items()}
        self.calls = 0

    def search(self, query: str, k: int) -> list[Result]:
        self.calls += 1
        time.sleep(0.001)
        pid = self.answer[query]
        first = pid if query in ("what is the capital of australia", "do goldfish grow") else "p5"
        return [Result(first, "", 2.0), Result(pid, "", 1.0)][:k]


def test_harness_metrics_latency_and_outputs(tmp_path, tiny_msmarco):
    ds = Dataset.from_dir(tiny_msmarco, "dev")
    searcher = Oracle(ds.qrels, ds.queries)
    result = run_benchmark(searcher, ds, BenchmarkConfig(k=10, warmup=2), progress=False)
    assert searcher.calls == 4 + 2
    assert result.evaluation.means["recall@1"] == pytest.approx(0.5)
    assert result.evaluation.means["mrr@10"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)
    assert set(result.latency) >= {"p50", "p95", "p99", "mean"} and result.latency["p50"] >= 1.0
    out = write_outputs(tmp_path / "out", "oracle", result, config={"k": 10}, dataset=ds.describe(), command="x")
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"]["recall@1"] == pytest.approx(0.5)
    assert set(saved["per_query"]) == set(ds.queries) and saved["per_query"]["q1"]["latency_ms"] > 0
    assert {"python", "cpu", "packages"} <= set(saved["environment"])
    assert "| oracle | 0.5000 |" in (out / "report.md").read_text()
    assert read_trec_run(out / "run.trec")["q1"][0][0] == "p1"


def test_latency_summary_percentiles():
    summary = latency_summary([float(i) for i in range(1, 101)])
    assert summary["p50"] == pytest.approx(50.5) and summary["p95"] == pytest.approx(95.05)
    assert summary["max"] == 100 and summary["n"] == 100


def test_benchmark_cli_on_bm25(tmp_path, tiny_msmarco, capsys):
    out = tmp_path / "bench"
    code = run_main(["--system", "bm25", "--data", str(tiny_msmarco), "--split", "dev", "--out", str(out),
                     f"run.dir={tmp_path / 'run'}", "benchmark.warmup=1", "bm25.expansion=null"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| bm25 | 1.0000 |" in printed  # every tiny query has an unambiguous answer
    assert (tmp_path / "run" / "bm25" / "manifest.json").is_file()
    assert json.loads((out / "results.json").read_text())["config"]["bm25"]["k1"] == 1.5


def test_any_searcher_plugs_in_by_import_path(tmp_path, tiny_msmarco, capsys):
    code = run_main(["--system", "tests.test_harness:FixedSearcher", "--data", str(tiny_msmarco),
                     "--out", str(tmp_path / "o")])
    assert code == 0 and "| tests.test_harness:FixedSearcher | 0.2500 |" in capsys.readouterr().out


class FixedSearcher:
    def search(self, query: str, k: int) -> list[Result]:
        return [Result("p1", "", 1.0)]
