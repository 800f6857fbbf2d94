"""Compare two TREC runs query by query: each with a bootstrap interval, and their difference with a
paired randomization test. An ablation's two arms are judged on the same queries, so the question is
whether B beats A on those queries, not whether two intervals overlap.

    python -m benchmarks.paired runs/mini/exp-a/dev_proxy.trec runs/mini/exp-b/dev_proxy.trec --split dev

Both runs must rank the same queries (a proxy run ranks a sample of them: only those are scored).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from irbase.config import add_config_args, load_section, parse_config_args
from irbase.dataset import add_dataset_args, dataset_from_args
from irbase.metrics import evaluate
from irbase.runconfig import DataConfig
from irbase.trec import read_trec_run

from benchmarks.stats import bootstrap_interval, paired_test, per_query_values

METRICS = ("recall@1", "recall@10", "recall@100", "mrr@10", "ndcg@10")


def compare_runs(a: dict[str, list[str]], b: dict[str, list[str]], qrels, names: tuple[str, str],
                 metrics: Sequence[str] = METRICS) -> list[dict]:
    """One row per metric: both means with 95% intervals, and B - A with its interval and p-value."""
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise ValueError(f"{names[0]} and {names[1]} rank different queries ({len(only)} in one only, first: "
                         f"{only[0]}): a paired comparison needs the same queries")
    unjudged = sorted(q for q in a if q not in qrels)
    if unjudged:
        raise ValueError(f"{len(unjudged)} ranked queries have no judgements in the split (first: {unjudged[0]}): "
                         "is --split the one the runs were made on?")
    judged = {q: qrels[q] for q in a}
    per_a, per_b = evaluate(a, judged).per_query, evaluate(b, judged).per_query
    qids = sorted(per_a)
    rows = []
    for metric in metrics:
        va, vb = per_query_values(per_a, metric, qids), per_query_values(per_b, metric, qids)
        test = paired_test(vb, va)
        rows.append({"metric": metric, "a": bootstrap_interval(va), "b": bootstrap_interval(vb), "diff": test})
    return rows


def rank1_overlap(a: dict[str, list[str]], b: dict[str, list[str]], qrels) -> dict[str, int]:
    """Queries each run answers at rank 1: two systems with equal recall@1 may win different queries,
    which is what fusing or reranking their candidates can exploit (`either` is that ceiling)."""
    judged = {q: qrels[q] for q in a if q in qrels}
    per_a, per_b = evaluate(a, judged).per_query, evaluate(b, judged).per_query
    counts = {"both": 0, "only_a": 0, "only_b": 0, "neither": 0}
    for q in per_a:
        ha, hb = per_a[q]["recall@1"] > 0, per_b[q]["recall@1"] > 0
        counts["both" if ha and hb else "only_a" if ha else "only_b" if hb else "neither"] += 1
    counts["either"] = counts["both"] + counts["only_a"] + counts["only_b"]
    return counts


def render(rows: list[dict], names: tuple[str, str]) -> str:
    def cell(iv) -> str:
        return f"{iv.mean:.3f} [{iv.low:.3f}, {iv.high:.3f}]"

    lines = [f"| metric | {names[0]} | {names[1]} | {names[1]} - {names[0]} | p |", "|---|---|---|---|---:|"]
    for row in rows:
        d = row["diff"]
        lines.append(f"| {row['metric']} | {cell(row['a'])} | {cell(row['b'])} | "
                     f"{d.difference:+.3f} [{d.low:+.3f}, {d.high:+.3f}] | {d.p_value:.4f} |")
    lines.append(f"\n{rows[0]['diff'].queries} queries; 95% bootstrap intervals; p: two-sided sign-flip "
                 "randomization test")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paired", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", help="TREC run of the baseline (A)")
    parser.add_argument("run_b", help="TREC run of the variant (B)")
    parser.add_argument("--names", nargs=2, metavar=("A", "B"), help="labels (default: the runs' folder names)")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    add_config_args(parser)
    add_dataset_args(parser, split=None)
    args = parse_config_args(parser, argv)
    data = load_section(args.config, "data", DataConfig, args.overrides)
    args.split = args.split or data.dev_split
    dataset = dataset_from_args(args, default_root=data.root)
    paths = (Path(args.run_a), Path(args.run_b))
    names = tuple(args.names or (p.parent.name for p in paths))
    runs = [{q: [pid for pid, _ in hits] for q, hits in read_trec_run(p).items()} for p in paths]
    print(render(compare_runs(runs[0], runs[1], dataset.qrels, names, args.metrics), names))
    o = rank1_overlap(runs[0], runs[1], dataset.qrels)
    print(f"\nAt rank 1: both {o['both']}, only {names[0]} {o['only_a']}, only {names[1]} {o['only_b']}, "
          f"neither {o['neither']}; either (oracle) {o['either']}/{len(runs[0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
