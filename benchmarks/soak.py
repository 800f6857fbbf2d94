"""A long run through one searcher: does memory creep, does the tail latency drift, do answers change?

    python -m benchmarks.soak --config configs/mini.yaml --queries 10000 --clients 1 4
    python -m benchmarks.soak --url http://127.0.0.1:8000 --server-pid PID --queries 10000 --clients 1 4

For each client count, N queries (the split's, cycled) go through one `Retriever()` shared by the client
threads, or with `--url` through a running `python -m pipeline.serve`. Every window of queries (1,000 by
default) reports its p50/p95 and the resident memory afterwards, of this process or of `--server-pid`.
Targets: resident memory drifts by less than 5% from the end of the first window to the end of the last,
and every window's p95 stays within 10% of the first window's. Afterwards a sample of queries is answered
once more, one at a time, by the soaked searcher and by a freshly loaded `Retriever`: the rankings must be
the same. Exits 1 when a target is missed or a query failed. Writes soak.json and report.md into --out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import cycle, islice
from pathlib import Path
from typing import Callable, Sequence

import psutil

from irbase.artifacts import atomic_write_json, atomic_write_text, environment
from irbase.config import add_config_args, load_section, parse_config_args
from irbase.dataset import Dataset
from irbase.runconfig import DataConfig, RunConfig
from irbase.search import Searcher

from benchmarks.harness import latency_summary
from benchmarks.load import HttpSearcher
from pipeline.retriever import Retriever

RSS_DRIFT = 0.05      # the targets
P95_DRIFT = 0.10


def run_windows(searcher: Searcher, texts: Sequence[str], clients: int, window: int,
                rss: Callable[[], int], k: int = 10) -> dict:
    """The queries in windows of `window`, `clients` at a time: per window its latency summary and the
    resident memory after it; a failed query is counted and the soak goes on."""
    windows, errors = [], []

    def one(text: str) -> float | None:
        start = time.perf_counter()
        try:
            searcher.search(text, k)
        except (OSError, ValueError) as exc:
            errors.append(f"{text[:40]!r}: {exc}")
            return None
        return (time.perf_counter() - start) * 1000.0

    with ThreadPoolExecutor(max_workers=clients) as pool:
        for start in range(0, len(texts), window):
            began = time.perf_counter()
            latencies = [ms for ms in pool.map(one, texts[start:start + window]) if ms is not None]
            windows.append({"queries": len(latencies), "wall_s": time.perf_counter() - began,
                            "latency_ms": latency_summary(latencies) if latencies else {},
                            "rss_mb": rss() / 2**20})
    first, last = windows[0], windows[-1]
    drift = (last["rss_mb"] - first["rss_mb"]) / first["rss_mb"]
    p95s = [w["latency_ms"]["p95"] for w in windows if w["latency_ms"]]
    worst = max(p95s) / p95s[0] - 1.0 if p95s else float("inf")
    return {"clients": clients, "queries": len(texts), "window": window, "windows": windows, "errors": len(errors),
            "first_errors": errors[:3], "rss_drift": drift, "worst_p95_drift": worst,
            "met": abs(drift) < RSS_DRIFT and worst <= P95_DRIFT and not errors}


def same_answers(soaked: Searcher, fresh: Searcher, texts: Sequence[str], k: int = 10,
                 atol: float = 1e-4) -> dict:
    """Each query once, sequentially, by both: the same ids in the same order, scores within `atol`."""
    equal, mismatches = 0, []
    for text in texts:
        a, b = soaked.search(text, k), fresh.search(text, k)
        same = [r.document_id for r in a] == [r.document_id for r in b] and all(
            abs(x.score - y.score) <= atol for x, y in zip(a, b))
        equal += same
        if not same and len(mismatches) < 3:
            mismatches.append({"query": text, "soaked": [r.document_id for r in a], "fresh": [r.document_id for r in b]})
    return {"queries": len(texts), "equal": equal, "fraction": equal / len(texts) if texts else 1.0,
            "first_mismatches": mismatches}


def report(result: dict) -> str:
    lines = ["| clients | queries | errors | first-window p95 ms | worst window p95 vs first | RSS after warm-up MB "
             "| RSS at the end MB | RSS drift | targets |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["runs"]:
        first, last = r["windows"][0], r["windows"][-1]
        lines.append(f"| {r['clients']} | {r['queries']} | {r['errors']} | {first['latency_ms'].get('p95', 0):.0f} | "
                     f"{r['worst_p95_drift']:+.1%} | {first['rss_mb']:.0f} | {last['rss_mb']:.0f} | "
                     f"{r['rss_drift']:+.1%} | {'met' if r['met'] else 'missed'} |")
    eq = result["answers"]
    lines.append(f"\nRerank depth {result.get('depth')}. "
                 f"Answers after the soak equal to a fresh Retriever's: {eq['equal']}/{eq['queries']}.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", help="default: data.dev_split")
    parser.add_argument("--queries", type=int, default=10_000, help="per client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--check", type=int, default=100, help="queries compared with a fresh Retriever")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--depth", type=int, help="candidates reranked per query (default: what the run serves)")
    parser.add_argument("--url", help="soak a running `python -m pipeline.serve` instead of an in-process Retriever")
    parser.add_argument("--server-pid", type=int, help="with --url: the service's process, whose memory is sampled")
    parser.add_argument("--out", help="default: <run.dir>/benchmarks/soak-<split>")
    add_config_args(parser)
    args = parse_config_args(parser, argv)
    if args.url and not args.server_pid:
        parser.error("--url needs --server-pid: the memory that matters is the service's")
    if min(args.queries, args.window, args.check, *args.clients) < 1:
        parser.error("--queries, --window, --check and --clients must be at least 1")
    if args.depth is not None and args.depth < 0:
        parser.error(f"--depth must be >= 0, got {args.depth}")
    run = load_section(args.config, "run", RunConfig, args.overrides)
    data = load_section(args.config, "data", DataConfig, args.overrides)
    split = args.split or data.dev_split
    texts = [text for _, text in sorted(Dataset.from_dir(data.root, split).queries.items())]
    process = psutil.Process(args.server_pid or os.getpid())
    if args.url:
        searcher: Searcher = HttpSearcher(args.url, depth=args.depth)
    else:
        searcher = Retriever(run.dir, depth=args.depth)
        searcher.warmup()
    runs = [run_windows(searcher, list(islice(cycle(texts), args.queries)), c, args.window,
                        lambda: process.memory_info().rss, args.k) for c in args.clients]
    fresh = Retriever(run.dir, depth=args.depth)
    answers = same_answers(searcher, fresh, texts[: args.check], args.k)
    result = {"command": "python -m benchmarks.soak " + " ".join(sys.argv[1:] if argv is None else argv),
              "split": split, "depth": fresh.serving.depth, "target": {"rss_drift": RSS_DRIFT, "p95_drift": P95_DRIFT},
              "runs": runs, "answers": answers, "service": args.url, "environment": environment()}
    out = Path(args.out or Path(run.dir) / "benchmarks" / f"soak-{split}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "soak.json", result)
    atomic_write_text(out / "report.md", report(result) + "\n")
    print(report(result))
    print(f"wrote {out / 'soak.json'}, {out / 'report.md'}")
    return 0 if all(r["met"] for r in runs) and answers["equal"] == answers["queries"] else 1


if __name__ == "__main__":
    sys.exit(main())
