"""Reranking a first stage's candidates and scoring the result: the measure of a reranker.

    python -m crossencoder.evaluate --config configs/mini.yaml [--model DIR] [section.key=value ...]

re-measures a saved cross-encoder as its training run does (a fixed random subset of dev, plain BM25's
top `crossencoder.eval.depth` reranked, the reranker's order alone) and keeps both rankings as TREC runs
beside the model (dev_rerank.trec, dev_rerank_bm25.trec), so two recipes can be compared query by query
with `python -m benchmarks.paired`. Writes eval-dev_rerank.json there.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from irbase.artifacts import atomic_write_json
from irbase.bm25 import build_or_load, configured
from irbase.config import add_config_args, from_dict, load_section, load_yaml
from irbase.dataset import Dataset
from irbase.fusion import merge_reranked
from irbase.metrics import evaluate
from irbase.runconfig import DataConfig, RunConfig, stage_dir
from irbase.trec import write_trec_run


class Scorer(Protocol):
    def score(self, query: str, passages: Sequence[str]) -> np.ndarray: ...


@dataclass
class RerankEvalConfig:
    queries: int | None = 200   # a fixed random subset of judged dev queries (None: all)
    depth: int = 100            # candidates reranked per query


def eval_queries(dataset: Dataset, limit: int | None, seed: int) -> list[str]:
    qids = sorted(dataset.queries)
    if limit is not None and limit < len(qids):
        qids = sorted(random.Random(seed).sample(qids, limit))
    return qids


def rerank(scorer: Scorer, dataset: Dataset, candidates: Mapping[str, Sequence[str]], qids: Sequence[str],
           depth: int, desc: str = "reranking") -> tuple[dict[str, list[tuple[str, float]]], list[float]]:
    """(reranked run, per-query scoring latency in ms); candidates below `depth` keep first-stage order."""
    collection = dataset.collection
    run, latencies = {}, []
    for qid in tqdm(qids, desc=desc, unit="q"):
        pids = list(candidates.get(qid, []))
        head, tail = pids[:depth], pids[depth:]
        start = time.perf_counter()
        scores = scorer.score(dataset.all_queries[qid], [collection[p] for p in head]) if head else np.zeros(0)
        latencies.append((time.perf_counter() - start) * 1000.0)
        order = np.argsort(-scores, kind="stable")
        ranked = [(head[i], float(scores[i])) for i in order]
        run[qid] = merge_reranked(ranked, tail, [-float(i) for i in range(len(tail))])
    return run, latencies


def metrics(run: Mapping[str, Sequence[tuple[str, float]]], dataset: Dataset, min_relevance: int = 1) -> dict[str, float]:
    ranked = {qid: [p for p, _ in hits] for qid, hits in run.items()}
    qrels = {qid: dataset.qrels[qid] for qid in ranked}
    return evaluate(ranked, qrels, min_relevance=min_relevance).means


class Bf16Scorer:
    """A trained CrossEncoder scoring under bf16 autocast where the hardware has it (as in training)."""

    def __init__(self, model: Any):
        self.model = model

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        return self.model.score(query, passages, bf16=True)


def evaluate_on_bm25(scorer: Scorer, config_path: str | None, overrides: Sequence[str], config: RerankEvalConfig,
                     out: Path) -> dict[str, Any]:
    """Plain BM25's top `config.depth` on a fixed subset of dev, reranked by `scorer` alone: the training
    run's own measure. Keeps both rankings in `out` (dev_rerank.trec, dev_rerank_bm25.trec)."""
    run = load_section(config_path, "run", RunConfig, overrides)
    data = load_section(config_path, "data", DataConfig, overrides)
    dev_set = Dataset.from_dir(data.root, data.dev_split)
    qids = eval_queries(dev_set, config.queries, run.seed)
    bm25, bm25_dir = configured(config_path, overrides, plain=True)
    ranked = build_or_load(bm25_dir, dev_set, bm25).search_ids([dev_set.all_queries[q] for q in qids],
                                                              max(config.depth, 100))
    candidates = {qid: [pid for pid, _ in hits] for qid, hits in zip(qids, ranked)}
    first = {q: [(p, -float(i)) for i, p in enumerate(pids)] for q, pids in candidates.items()}
    start = time.perf_counter()
    reranked, _ = rerank(scorer, dev_set, candidates, qids, config.depth)
    summary = dict(dev_split=dev_set.split, eval_queries=len(qids), eval_depth=config.depth,
                   bm25=metrics(first, dev_set), reranked=metrics(reranked, dev_set),
                   eval_seconds=time.perf_counter() - start)
    write_trec_run(out / "dev_rerank.trec", reranked, tag="crossencoder")
    write_trec_run(out / "dev_rerank_bm25.trec", first, tag="bm25")
    for name in ("bm25", "reranked"):
        print(name, " ".join(f"{k}={v:.4f}" for k, v in summary[name].items()))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    from crossencoder.model import CrossEncoder

    parser = argparse.ArgumentParser(prog="python -m crossencoder.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="saved cross-encoder (default: <run.dir>/<crossencoder.name>/model)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    model_dir = Path(args.model or stage_dir(args.config, args.overrides, "crossencoder") / "model")
    raw = load_yaml(args.config, args.overrides).get("crossencoder", {}).get("eval")
    config = from_dict(RerankEvalConfig, raw, f"{args.config}:crossencoder.eval")
    summary = evaluate_on_bm25(Bf16Scorer(CrossEncoder.load(model_dir)), args.config, args.overrides, config,
                               model_dir.parent)
    atomic_write_json(model_dir.parent / "eval-dev_rerank.json", {**summary, "model": str(model_dir)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
