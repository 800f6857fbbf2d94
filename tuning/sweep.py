"""Tune the rerank depth, ONNX variant and reranker weight of a built run against p95 latency and recall@1.

    python -m tuning.sweep --run runs/mini --split dev-large --sample 1000 [--latency-sample 100]
                               [--depths 0 5 10 20 30 50] [--variants fp32 int8] [--rerank-weights ...]
                               [--margin 0.8] [--no-write]

Two measurements on the tuning split, then one choice:
1. Latency. Each (variant, depth) serves --latency-sample queries one at a time after a warm-up, with no
   deadline (the true cost). A variant's depths beyond the first whose p95 exceeds margin x budget are not
   measured: more candidates never cost less.
2. Quality on every sampled query, for each (variant, depth) within the margin. The first stage runs once
   per query; the reranker scores each candidate in the same batches `Retriever` would (int8 quantizes each
   batch's activations together, so a batch's scores depend on its company), and a batch that two depths
   share is scored once. Every reranker weight of the grid reorders those scores offline, exactly as
   `Retriever` with that depth and weight would (a test checks it), and each (variant, depth) keeps its best.
Among the rows whose p95 stays within margin x budget it takes the best recall@1 (then MRR@10, then the
lower p95), and records every such row's distance from it with the standard error of that paired
difference. (Taking the fastest row within one standard error instead served -0.008 recall@1 on mini dev
for p95 759 -> 154 ms; not adopted: benchmarks/reports/pipeline-mini-dev.md.) The choice is written into
the run's pipeline.json: depth, variant and rerank_weight. Its paired gain over depth 0 is printed and
recorded.
Depth and weight are fitted together on many queries of a tuning split (dev-large), so dev stays a test.
Writes sweep.json and sweep.png into --out (default <run>/tuning/sweep-<split>).
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from irbase.artifacts import atomic_path, atomic_write_json, environment
from irbase.config import add_config_args, load_section, parse_config_args
from irbase.dataset import add_dataset_args, dataset_from_args
from irbase.metrics import evaluate
from irbase.runconfig import DataConfig, RunConfig

from tuning.fusion import RERANK_WEIGHTS
from benchmarks.harness import latency_summary, select_queries
from tuning.offline import offline_runs
from tuning.provenance import provenance
from benchmarks.stats import paired_test, per_query_values, standard_error
from pipeline.config import RunRecord
from pipeline.retriever import Retriever

log = logging.getLogger(__name__)

DEPTHS = (0, 5, 10, 20, 30, 50, 100, 200)


def measure_latency(retrievers: dict[str, Retriever], queries: list[tuple[str, str]], depths: Sequence[int],
                    limit_ms: float, k: int = 100, warmup: int = 5) -> list[dict]:
    """p50/p95/p99 of whole searches per (variant, depth); a variant stops after its first depth whose p95
    exceeds limit_ms. Depth 0 (no reranker) is measured once."""
    rows: list[dict] = []
    for variant, retriever in retrievers.items():
        for depth in sorted(set(depths)):
            if depth == 0 and any(r["depth"] == 0 for r in rows):
                continue
            for _, text in queries[:warmup]:
                retriever.search_detailed(text, k, depth=depth)
            latencies, reranked = [], 0
            for _, text in tqdm(queries, desc=f"latency {variant} depth {depth}", unit="q"):
                start = time.perf_counter()
                response = retriever.search_detailed(text, k, depth=depth)
                latencies.append((time.perf_counter() - start) * 1000.0)
                reranked += response.reranked
            rows.append({"variant": variant if depth else "none", "depth": depth,
                         "latency_ms": latency_summary(latencies), "reranked_per_query": reranked / len(queries)})
            if rows[-1]["latency_ms"]["p95"] > limit_ms:
                break
    return rows


def quality(runs: dict[tuple[int, float | None], dict[str, list[str]]], qrels) -> dict[int, dict]:
    """Per depth: every weight's recall@1 / MRR@10, the best weight (recall@1, then MRR@10) and its
    per-query recall@1 (for the paired test against depth 0)."""
    by_depth: dict[int, dict] = {}
    for (depth, weight), run in runs.items():
        evaluation = evaluate(run, {q: qrels[q] for q in run})
        row = {"rerank_weight": weight, **{m: evaluation.means[m] for m in ("recall@1", "mrr@10", "recall@100")}}
        entry = by_depth.setdefault(depth, {"weights": []})
        entry["weights"].append(row)
        best = entry.get("best")
        if best is None or (row["recall@1"], row["mrr@10"]) > (best["recall@1"], best["mrr@10"]):
            entry["best"], entry["per_query"] = row, evaluation.per_query
    return by_depth


def within_margin(rows: list[dict], budget_ms: float, margin: float) -> list[dict]:
    """The rows with a quality measurement whose p95 <= margin x budget: the only ones the sweep may choose."""
    return [r for r in rows if "recall@1" in r and r["latency_ms"]["p95"] <= margin * budget_ms]


def choose(rows: list[dict], budget_ms: float, margin: float) -> dict:
    """Best recall@1 (then MRR@10, then lower p95) among measured rows whose p95 <= margin x budget."""
    allowed = within_margin(rows, budget_ms, margin)
    if not allowed:
        raise SystemExit(f"no configuration has p95 within {margin} x {budget_ms} ms")
    return max(allowed, key=lambda r: (round(r["recall@1"], 6), round(r["mrr@10"], 6), -r["latency_ms"]["p95"]))


def distances_from_best(rows: list[dict], per_query: dict[tuple[str, int], dict], qids: Sequence[str],
                        best: dict, budget_ms: float, margin: float) -> None:
    """Give each row within the margin `behind_best`: the best's recall@1 minus its own over the same queries,
    with the standard error of that paired difference."""
    reference = per_query_values(per_query[(best["variant"], best["depth"])], "recall@1", qids)
    for row in within_margin(rows, budget_ms, margin):
        diff = reference - per_query_values(per_query[(row["variant"], row["depth"])], "recall@1", qids)
        row["behind_best"] = {"difference": float(diff.mean()), "standard_error": standard_error(diff)}


def sweep(retrievers: dict[str, Retriever], queries: list[tuple[str, str]], latency_queries: list[tuple[str, str]],
          qrels, depths: Sequence[int], weights: Sequence[float | None], budget_ms: float, margin: float,
          k: int = 100) -> tuple[list[dict], dict]:
    """Latency rows, each within the margin with its quality on `queries` at its best weight; and the choice
    (the best recall@1), with its paired recall@1 gain over depth 0 on the same queries."""
    limit_ms = margin * budget_ms
    rows = measure_latency(retrievers, latency_queries, sorted({0, *depths}), limit_ms, k)
    metrics = ("recall@1", "mrr@10", "recall@100")
    first: dict = {}
    per_query: dict[tuple[str, int], dict] = {}
    for variant, retriever in retrievers.items():
        within = [r for r in rows if r["variant"] == variant and r["latency_ms"]["p95"] <= limit_ms]
        variant_depths = [0] * (not per_query) + [r["depth"] for r in within]
        for depth, entry in quality(offline_runs(retriever, queries, variant_depths, weights, k, first), qrels).items():
            row = next(r for r in rows if r["depth"] == depth and (r["variant"] == variant or not depth))
            row.update({m: entry["best"][m] for m in metrics}, queries=len(queries))
            if depth:
                row.update(rerank_weight=entry["best"]["rerank_weight"], weights=entry["weights"])
            per_query[(row["variant"], depth)] = entry["per_query"]
    qids = sorted(q for q, _ in queries)
    chosen = choose(rows, budget_ms, margin)
    distances_from_best(rows, per_query, qids, chosen, budget_ms, margin)
    test = paired_test(per_query_values(per_query[(chosen["variant"], chosen["depth"])], "recall@1", qids),
                       per_query_values(per_query[("none", 0)], "recall@1", qids))
    gain = {"difference": test.difference, "low": test.low, "high": test.high, "p_value": test.p_value}
    return rows, {**chosen, "gain_over_depth_0": gain}


def plot(rows: list[dict], budget_ms: float, margin: float, path: Path, chosen: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = [r for r in rows if r["depth"] == 0]
    for variant in sorted({r["variant"] for r in rows if r["depth"]}):
        line = base + sorted((r for r in rows if r["variant"] == variant and "recall@1" in r), key=lambda r: r["depth"])
        ax.plot([r["latency_ms"]["p95"] for r in line], [r["recall@1"] for r in line], marker="o", label=variant)
        for r in line:
            ax.annotate(str(r["depth"]), (r["latency_ms"]["p95"], r["recall@1"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axvline(budget_ms, color="red", linestyle="--", label=f"budget {budget_ms:.0f} ms")
    ax.axvline(margin * budget_ms, color="orange", linestyle=":", label=f"budget x {margin}")
    ax.scatter([chosen["latency_ms"]["p95"]], [chosen["recall@1"]], s=160, facecolors="none", edgecolors="black",
               label=f"chosen: {chosen['variant']} depth {chosen['depth']}")
    ax.set_xlabel("p95 latency per search (ms), one query at a time")
    ax.set_ylabel("recall@1 at the depth's best reranker weight")
    ax.set_title("Rerank depth sweep (labels: depth)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tuning.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="built run directory (default: run.dir of the config)")
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS), help="depth 0 is always measured")
    parser.add_argument("--variants", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--rerank-weights", type=float, nargs="+", default=list(RERANK_WEIGHTS),
                        help="fitted per depth, with the reranker alone (none) beside them")
    parser.add_argument("--sample", type=int, help="a fixed random subset of the judged queries (default: all)")
    parser.add_argument("--latency-sample", type=int, default=100,
                        help="queries of that subset timed per (variant, depth)")
    parser.add_argument("--margin", type=float, default=0.8, help="p95 must stay within margin x budget")
    parser.add_argument("--out", help="default: <run>/tuning/sweep-<split>")
    parser.add_argument("--no-write", action="store_true", help="do not write the choice into the run")
    add_config_args(parser)
    add_dataset_args(parser, split=None)
    return parser


def _exported_variants(parser: argparse.ArgumentParser, asked: Sequence[str], onnx_dir: Path) -> list[str]:
    """The asked variants with a checked export; the others are skipped with a warning."""
    variants = [v for v in asked if (onnx_dir / v / "export.json").exists()]
    for v in sorted(set(asked) - set(variants)):
        log.warning("variant %s: no checked export in %s (refused or not exported); skipped", v, onnx_dir / v)
    if not variants:
        parser.error(f"--variants {' '.join(asked)}: none is exported in {onnx_dir}")
    return variants


def _print_table(rows: list[dict], chosen: dict, margin: float, budget: float) -> None:
    print(f"{'variant':<8} {'depth':>5} {'weight':>6} {'R@1':>7} {'MRR@10':>7} {'R@100':>7} {'p50':>7} {'p95':>7} "
          f"{'p99':>7} {'best-R@1 (se)':>15}")
    for r in rows:
        lat = r["latency_ms"]
        mark = "  <- chosen" if (r["variant"], r["depth"]) == (chosen["variant"], chosen["depth"]) else ""
        weight = "-" if "rerank_weight" not in r else \
            "alone" if r["rerank_weight"] is None else f"{r['rerank_weight']:.2f}"
        quality_cells = (f"{r['recall@1']:>7.4f} {r['mrr@10']:>7.4f} {r['recall@100']:>7.4f}" if "recall@1" in r
                         else f"{'p95 over ' + str(round(margin * budget)) + ' ms':>23}")
        behind = f"{r['behind_best']['difference']:+.4f} ({r['behind_best']['standard_error']:.4f})" \
            if "behind_best" in r else ""
        print(f"{r['variant']:<8} {r['depth']:>5} {weight:>6} {quality_cells} {lat['p50']:>7.1f} {lat['p95']:>7.1f} "
              f"{lat['p99']:>7.1f} {behind:>15}{mark}")


def _choice(chosen: dict, serving, args: argparse.Namespace, argv: Sequence[str] | None, budget: float,
            queries: int, timed: int) -> dict:
    """The tuned record: at depth 0 the variant and weight serve nothing, so the recipe's stay."""
    reranks = chosen["depth"] > 0
    return {"variant": chosen["variant"] if reranks else serving.variant, "depth": chosen["depth"],
            "rerank_weight": chosen["rerank_weight"] if reranks else serving.rerank_weight,
            "recall@1": chosen["recall@1"], "p95_ms": chosen["latency_ms"]["p95"], "budget_ms": budget,
            "margin": args.margin, "split": args.split, "queries": queries, "latency_queries": timed,
            "gain_over_depth_0": chosen["gain_over_depth_0"],
            **provenance("tuning.sweep", argv, {k: getattr(serving, k) for k in ("depth", "variant",
                                                                                 "rerank_weight")})}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parse_config_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = load_section(args.config, "data", DataConfig, args.overrides)
    args.split = args.split or data.dev_split
    dataset = dataset_from_args(args, default_root=data.root)
    run_dir = Path(args.run or load_section(args.config, "run", RunConfig, args.overrides).dir)
    if any(d < 0 for d in args.depths):
        parser.error("--depths must be >= 0")
    if args.latency_sample < 1:
        parser.error("--latency-sample must be >= 1")
    record = RunRecord.load(run_dir)
    budget = record.serving.latency_budget_ms
    variants = _exported_variants(parser, args.variants, run_dir / record.serving.crossencoder / "onnx")
    retrievers = {v: Retriever(run_dir, variant=v, depth=max(args.depths), latency_budget_ms=float("inf"))
                  for v in variants}
    queries = select_queries(dataset, args.sample, seed=13)
    timed = queries if args.latency_sample >= len(queries) else \
        sorted(random.Random(13).sample(queries, args.latency_sample))
    rows, chosen = sweep(retrievers, queries, timed, dataset.qrels, args.depths, [None, *args.rerank_weights],
                         budget, args.margin)
    print(f"\n{args.split}: quality on {len(queries)} queries at each depth's best reranker weight, latency on "
          f"{len(timed)} of them")
    _print_table(rows, chosen, args.margin, budget)
    out = Path(args.out or run_dir / "tuning" / f"sweep-{args.split}")
    out.mkdir(parents=True, exist_ok=True)
    choice = _choice(chosen, record.serving, args, argv, budget, len(queries), len(timed))
    atomic_write_json(out / "sweep.json", {"rows": rows, "choice": choice, "dataset": dataset.describe(),
                                           "environment": environment()})
    plot(rows, budget, args.margin, out / "sweep.png", chosen)
    if not args.no_write:
        record.serving.depth, record.serving.variant = choice["depth"], choice["variant"]
        record.serving.rerank_weight = choice["rerank_weight"]
        record.sweep = choice
        record.save(run_dir)
    print("chosen: " + (f"{choice['variant']} depth {choice['depth']}, rerank_weight {choice['rerank_weight']}"
                        if choice["depth"] > 0 else "depth 0 (no reranking)")
          + f" (recall@1 {choice['recall@1']:.4f}, p95 {choice['p95_ms']:.0f} ms <= {args.margin} x {budget:.0f} ms)"
          + ("" if args.no_write else f", written to {run_dir / 'pipeline.json'}"))
    gain = choice["gain_over_depth_0"]
    print(f"recall@1 minus depth 0 on the same {len(queries)} queries: {gain['difference']:+.4f} "
          f"[{gain['low']:+.4f}, {gain['high']:+.4f}], p {gain['p_value']:.4f}")
    print(f"wrote {out}/sweep.json, sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
