"""The reranker on its own: each first stage's top candidates reranked by each backend, and the cost of
scoring n candidates for one query.

    python -m benchmarks.rerank --config configs/mini.yaml --split dev --queries 50 --depth 100
    python -m benchmarks.rerank --config configs/mini.yaml --split dev-large --queries 200 --depth 30 \
        --first pipeline-hybrid --backends int8 --fusion-depths 10 20 30 --fusion-weights 0.5 1 2 --latency-queries 0

Backends: `torch` (the trained model, fp32), and the exported ONNX variants (`fp32`, `int8`, ...). First
stages: `bm25` and `pipeline-dense` (the run's bi-encoder over its HNSW index), or any harness system
(`pipeline-hybrid`). Every backend scores the same pairs; a pair shared by two first stages is scored once
per backend. With --fusion-weights, the same scores also give the rank-fusion serving order
(`pipeline.fusion: rrf`: the reranker's ranking of the top d fused with the first stage's by reciprocal
rank) for each weight and depth d, so the weight is tuned without scoring again; score fusion's weights are
fitted by tuning.fusion. Writes rerank.json into --out.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from irbase.artifacts import atomic_write_json, environment
from irbase.config import add_config_args, load_section, parse_config_args
from irbase.dataset import Dataset
from irbase.metrics import evaluate
from irbase.runconfig import DataConfig, RunConfig

from irbase.components import Reranker
from pipeline.config import RunRecord, ServingConfig
from pipeline.context import RunContext
from pipeline.rerankers import RERANKERS
from irbase.fusion import merge_reranked, rerank_order

from benchmarks.harness import select_queries
from benchmarks.systems import make_system

LATENCY_SIZES = (10, 20, 50, 100)


def make_scorer(name: str, run_dir: Path, serving: ServingConfig, threads: int | None) -> Reranker:
    """`torch` (the trained model) or an ONNX variant, from the registered rerankers, 32 pairs a call."""
    serving = replace(serving, threads=threads, rerank_batch=32)
    context = RunContext(Path(run_dir), RunRecord(serving=serving), serving)
    backend, variant = ("torch", "fp32") if name == "torch" else ("onnx", name)
    return RERANKERS.get(backend)(context, variant)


def first_stage(name: str, config: str | None, overrides: list[str], dataset: Dataset,
                queries: list[tuple[str, str]], depth: int) -> dict[str, list[str]]:
    searcher, _ = make_system(name, config, overrides, dataset)
    return {qid: [r.document_id for r in searcher.search(text, depth)]
            for qid, text in tqdm(queries, desc=f"{name} top-{depth}", unit="q")}


def score_metrics(ranked: dict[str, list[str]], dataset: Dataset) -> dict[str, float]:
    means = evaluate(ranked, {q: dataset.qrels[q] for q in ranked}).means
    return {m: means[m] for m in ("recall@1", "mrr@10", "ndcg@10", "recall@100") if m in means}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rerank", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", help="default: data.dev_split")
    parser.add_argument("--queries", type=int, default=50, help="fixed random subset of judged queries")
    parser.add_argument("--depth", type=int, default=100, help="candidates reranked per query")
    parser.add_argument("--first", nargs="+", default=["bm25", "pipeline-dense"],
                        help="first stages (harness systems; pipeline-dense: the run's bi-encoder and HNSW index)")
    parser.add_argument("--backends", nargs="+", default=["torch", "fp32", "int8"],
                        choices=["torch", "fp32", "int8", "fp16"],
                        help="config overrides go before this list, or it takes them for backends")
    parser.add_argument("--latency-queries", type=int, default=10,
                        help="queries timed per candidate count (0: no timing)")
    parser.add_argument("--fusion-weights", type=float, nargs="*", default=[],
                        help="reranker weights of the rank fusion to evaluate (pipeline.rerank_weight under fusion: rrf)")
    parser.add_argument("--fusion-depths", type=int, nargs="*", help="candidates fused (default: --depth)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all)")
    parser.add_argument("--out", help="default: <run.dir>/benchmarks/rerank-<split>")
    add_config_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_config_args(_parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    run = load_section(args.config, "run", RunConfig, args.overrides)
    data = load_section(args.config, "data", DataConfig, args.overrides)
    split = args.split or data.dev_split
    dataset = Dataset.from_dir(data.root, split)
    serving = load_section(args.config, "pipeline", ServingConfig, args.overrides)
    queries = select_queries(dataset, args.queries, run.seed)
    candidates = {name: first_stage(name, args.config, args.overrides, dataset, queries, args.depth)
                  for name in args.first}
    rows, latency, fused = rerank_all(args, Path(run.dir), serving, dataset, queries, candidates)

    print_tables(split, len(queries), args.depth, args.latency_queries, serving.fusion_k, rows, fused, latency)
    out = Path(args.out or Path(run.dir) / "benchmarks" / f"rerank-{split}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "rerank.json", {
        "command": "python -m benchmarks.rerank " + shlex.join(sys.argv[1:] if argv is None else argv),
        "split": split, "queries": len(queries), "depth": args.depth, "rows": rows, "fusion": fused,
        "fusion_k": serving.fusion_k, "latency_ms": latency,
        "environment": environment()})
    print(f"wrote {out / 'rerank.json'}")
    return 0


def rerank_all(args: argparse.Namespace, run_dir: Path, serving: ServingConfig, dataset: Dataset,
               queries: list[tuple[str, str]], candidates: dict[str, dict[str, list[str]]]
               ) -> tuple[list[dict], dict[str, dict[str, float]], list[dict]]:
    """(metric rows per first stage and backend, scoring latency per backend, rank-fusion rows): each backend
    scores every query's candidates from all first stages once, then is dropped before the next is loaded."""
    texts = dict(queries)
    collection = dataset.collection
    fusion_depths = [d for d in (args.fusion_depths or [args.depth]) if d <= args.depth]
    rows, latency, fused = [], {}, []
    for name in args.first:
        rows.append({"first_stage": name, "backend": "none", **score_metrics(candidates[name], dataset)})
    for backend in args.backends:
        scorer = make_scorer(backend, run_dir, serving, args.threads)
        cache: dict[tuple[str, str], float] = {}
        for qid, _ in tqdm(queries, desc=f"scoring with {backend}", unit="q"):
            pids = sorted({p for name in args.first for p in candidates[name][qid]})
            scores = scorer.score(texts[qid], [collection[p] for p in pids])
            cache.update({(qid, p): float(s) for p, s in zip(pids, scores)})
        for name in args.first:
            ranked = {qid: sorted(pids, key=lambda p, q=qid: -cache[(q, p)]) for qid, pids in candidates[name].items()}
            rows.append({"first_stage": name, "backend": backend, **score_metrics(ranked, dataset)})
            for depth in fusion_depths if args.fusion_weights else []:
                fused.append({"first_stage": name, "backend": backend, "depth": depth, "weights": {
                    str(w): score_metrics(fuse(candidates[name], cache, depth, serving.fusion_k, w), dataset)
                    for w in [None, *args.fusion_weights]}})
        if args.latency_queries > 0:
            sizes = [n for n in LATENCY_SIZES if n <= args.depth]
            latency[backend] = time_scoring(scorer, queries[: args.latency_queries], candidates[args.first[0]],
                                            texts, collection, sizes)
        del scorer
    return rows, latency, fused


def print_tables(split: str, num_queries: int, depth: int, latency_queries: int, fusion_k: int, rows: list[dict],
                 fused: list[dict], latency: dict[str, dict[str, float]]) -> None:
    """The metric table, the rank-fusion tables when any were evaluated and the latency table, as markdown."""
    print(f"\n{split}: {num_queries} queries, top-{depth} reranked")
    print("| first stage | reranker | recall@1 | MRR@10 | nDCG@10 | recall@100 |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['first_stage']} | {r['backend']} | {r['recall@1']:.3f} | {r['mrr@10']:.3f} | "
              f"{r['ndcg@10']:.3f} | {r.get('recall@100', float('nan')):.3f} |")
    for metric in ("recall@1", "mrr@10") if fused else ():
        print(f"\n{metric} of the served order: first stage's top d reranked, fused with the first stage's ranks "
              f"(k {fusion_k}) at each reranker weight (None: reranker order alone)")
        weights = list(fused[0]["weights"])
        first_alone = {r["first_stage"]: r[metric] for r in rows if r["backend"] == "none"}
        print("| first stage | reranker | d | first stage alone | " + " | ".join(f"w {w}" for w in weights)
              + " |\n|---|---|---:|---:|" + "---:|" * len(weights))
        for r in fused:
            print(f"| {r['first_stage']} | {r['backend']} | {r['depth']} | {first_alone[r['first_stage']]:.3f} | "
                  + " | ".join(f"{r['weights'][w][metric]:.3f}" for w in weights) + " |")
    for backend, sizes in latency.items():
        if backend == next(iter(latency)):
            print(f"\nscoring one query's candidates, median ms over {latency_queries} queries (pairs/s at "
                  "the largest size)\n| backend | " + " | ".join(f"{n} cand." for n in sizes) + " | pairs/s |\n|---|"
                  + "---:|" * (len(sizes) + 1))
        largest = list(sizes)[-1]
        print(f"| {backend} | " + " | ".join(f"{ms:.0f}" for ms in sizes.values())
              + f" | {int(largest) / sizes[largest] * 1000:.0f} |")


def fuse(candidates: dict[str, list[str]], scores: dict[tuple[str, str], float], depth: int, k: int,
         weight: float | None) -> dict[str, list[str]]:
    """What Retriever serves: the top `depth` in rerank_order, the rest in first-stage order below them."""
    out = {}
    for qid, pids in candidates.items():
        head = pids[:depth]
        order = rerank_order(head, [scores[(qid, p)] for p in head], k, weight)
        out[qid] = [p for p, _ in merge_reranked(order, pids[depth:], [0.0] * len(pids[depth:]))]
    return out


def time_scoring(scorer, queries: list[tuple[str, str]], candidates: dict[str, list[str]],
                 texts: dict[str, str], collection: dict[str, str], sizes: Sequence[int]) -> dict[str, float]:
    """Median wall time of one score() call over n candidates, after one untimed call."""
    qid0 = queries[0][0]
    scorer.score(texts[qid0], [collection[p] for p in candidates[qid0][:10]])
    out = {}
    for n in sizes:
        times = []
        for qid, _ in queries:
            passages = [collection[p] for p in candidates[qid][:n]]
            if len(passages) < n:
                continue  # a first stage that returned fewer: not a measurement of n
            start = time.perf_counter()
            scorer.score(texts[qid], passages)
            times.append((time.perf_counter() - start) * 1000.0)
        if times:
            out[str(n)] = statistics.median(times)
    return out


if __name__ == "__main__":
    sys.exit(main())
