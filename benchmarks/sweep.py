"""Tune the rerank depth (and ONNX variant) of a built run against p95 latency and recall@1.

    python -m benchmarks.sweep --run runs/mini --split dev [--depths 0 5 10 20 30 50 100 200]
                               [--variants fp32 int8] [--sample 200] [--margin 0.8] [--no-write]

Every (variant, depth) runs in this one process on the same queries, one query at a time after a
warm-up, with no deadline (the true cost is measured). The best recall@1 whose p95 stays within
margin x budget is written into the run's pipeline.json, so `Retriever()` serves it.
Writes sweep.json and sweep.png into --out (default <run>/benchmarks/sweep-<split>).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from irbase.artifacts import atomic_path, atomic_write_json, environment
from irbase.config import add_config_args, load_section
from irbase.dataset import add_dataset_args, dataset_from_args
from irbase.metrics import evaluate
from irbase.runconfig import DataConfig

from benchmarks.harness import latency_summary, select_queries
from pipeline.config import RunRecord
from pipeline.retriever import Retriever

log = logging.getLogger(__name__)

DEPTHS = (0, 5, 10, 20, 30, 50, 100, 200)


def sweep(retrievers: dict[str, Retriever], queries: list[tuple[str, str]], qrels, depths: Sequence[int],
          k: int = 100, warmup: int = 5) -> list[dict]:
    rows = []
    for variant, retriever in retrievers.items():
        for depth in depths:
            if depth == 0 and rows and any(r["depth"] == 0 for r in rows):
                continue  # no rerank: the variant does not matter
            for _, text in queries[:warmup]:
                retriever.search_detailed(text, k, depth=depth)
            ranked, latencies, reranked = {}, [], 0
            for qid, text in tqdm(queries, desc=f"{variant} depth {depth}", unit="q"):
                start = time.perf_counter()
                response = retriever.search_detailed(text, k, depth=depth)
                latencies.append((time.perf_counter() - start) * 1000.0)
                ranked[qid] = [r.document_id for r in response.results]
                reranked += response.reranked
            means = evaluate(ranked, {q: qrels[q] for q in ranked}).means
            rows.append({"variant": variant if depth else "none", "depth": depth, **means,
                         "latency_ms": latency_summary(latencies), "reranked_per_query": reranked / len(queries)})
    return rows


def choose(rows: list[dict], budget_ms: float, margin: float) -> dict:
    """Best recall@1 (then MRR@10, then lower p95) among rows whose p95 <= margin x budget."""
    allowed = [r for r in rows if r["latency_ms"]["p95"] <= margin * budget_ms]
    if not allowed:
        raise SystemExit(f"no configuration has p95 within {margin} x {budget_ms} ms")
    return max(allowed, key=lambda r: (round(r["recall@1"], 6), round(r["mrr@10"], 6), -r["latency_ms"]["p95"]))


def plot(rows: list[dict], budget_ms: float, margin: float, path: Path, chosen: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = [r for r in rows if r["depth"] == 0]
    for variant in sorted({r["variant"] for r in rows if r["depth"]}):
        line = base + sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["depth"])
        ax.plot([r["latency_ms"]["p95"] for r in line], [r["recall@1"] for r in line], marker="o", label=variant)
        for r in line:
            ax.annotate(str(r["depth"]), (r["latency_ms"]["p95"], r["recall@1"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axvline(budget_ms, color="red", linestyle="--", label=f"budget {budget_ms:.0f} ms")
    ax.axvline(margin * budget_ms, color="orange", linestyle=":", label=f"budget x {margin}")
    ax.scatter([chosen["latency_ms"]["p95"]], [chosen["recall@1"]], s=160, facecolors="none", edgecolors="black",
               label=f"chosen: {chosen['variant']} depth {chosen['depth']}")
    ax.set_xlabel("p95 latency per search (ms), one query at a time")
    ax.set_ylabel("recall@1")
    ax.set_title("Rerank depth sweep (labels: depth)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="built run directory (default: run.dir of the config)")
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    parser.add_argument("--variants", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--sample", type=int, help="a fixed random subset of the judged queries (default: all)")
    parser.add_argument("--margin", type=float, default=0.8, help="p95 must stay within margin x budget")
    parser.add_argument("--out", help="default: <run>/benchmarks/sweep-<split>")
    parser.add_argument("--no-write", action="store_true", help="do not write the choice into the run")
    add_config_args(parser)
    add_dataset_args(parser, split=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = load_section(args.config, "data", DataConfig, args.overrides)
    args.split = args.split or data.dev_split
    dataset = dataset_from_args(args, default_root=data.root)
    from irbase.runconfig import RunConfig

    run_dir = Path(args.run or load_section(args.config, "run", RunConfig, args.overrides).dir)
    if any(d < 0 for d in args.depths):
        parser.error("--depths must be >= 0")
    record = RunRecord.load(run_dir)
    budget = record.serving.latency_budget_ms
    onnx_dir = run_dir / record.serving.crossencoder / "onnx"
    variants = [v for v in args.variants if (onnx_dir / v / "export.json").exists()]
    for v in sorted(set(args.variants) - set(variants)):
        log.warning("variant %s: no checked export in %s (refused or not exported); skipped", v, onnx_dir / v)
    if not variants:
        parser.error(f"--variants {' '.join(args.variants)}: none is exported in {onnx_dir}")
    retrievers = {v: Retriever(run_dir, variant=v, depth=max(args.depths), latency_budget_ms=float("inf"))
                  for v in variants}
    queries = select_queries(dataset, args.sample, seed=13)
    rows = sweep(retrievers, queries, dataset.qrels, sorted(set(args.depths)))
    chosen = choose(rows, budget, args.margin)
    print(f"\n{'variant':<8} {'depth':>5} {'R@1':>7} {'MRR@10':>7} {'R@100':>7} {'p50':>7} {'p95':>7} {'p99':>7}")
    for r in rows:
        lat = r["latency_ms"]
        mark = "  <- chosen" if r is chosen else ""
        print(f"{r['variant']:<8} {r['depth']:>5} {r['recall@1']:>7.4f} {r['mrr@10']:>7.4f} {r['recall@100']:>7.4f} "
              f"{lat['p50']:>7.1f} {lat['p95']:>7.1f} {lat['p99']:>7.1f}{mark}")
    out = Path(args.out or run_dir / "benchmarks" / f"sweep-{args.split}")
    out.mkdir(parents=True, exist_ok=True)
    choice = {"variant": chosen["variant"] if chosen["depth"] else record.serving.variant, "depth": chosen["depth"],
              "recall@1": chosen["recall@1"], "p95_ms": chosen["latency_ms"]["p95"], "budget_ms": budget,
              "margin": args.margin, "split": args.split, "queries": len(queries)}
    atomic_write_json(out / "sweep.json", {"rows": rows, "choice": choice, "dataset": dataset.describe(),
                                           "environment": environment()})
    plot(rows, budget, args.margin, out / "sweep.png", chosen)
    if not args.no_write:
        record.serving.depth, record.serving.variant = choice["depth"], choice["variant"]
        record.sweep = choice
        record.save(run_dir)
    print(f"chosen: {choice['variant']} depth {choice['depth']} (recall@1 {choice['recall@1']:.4f}, p95 "
          f"{choice['p95_ms']:.0f} ms <= {args.margin} x {budget:.0f} ms)"
          + ("" if args.no_write else f", written to {run_dir / 'pipeline.json'}"))
    print(f"wrote {out}/sweep.json, sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
