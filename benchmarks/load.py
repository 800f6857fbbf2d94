"""Concurrent clients against one searcher: throughput and tail latency as load grows.

    python -m benchmarks.load --config configs/mini.yaml --split dev --concurrency 1 2 4 --queries 100

N threads share one `Retriever()` (as a web server's workers would) and each calls `search` for its
share of a fixed query list; latency is measured per call, wall time over the whole batch.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from irbase.config import add_config_args, load_section
from irbase.dataset import Dataset
from irbase.runconfig import DataConfig, RunConfig
from irbase.search import Searcher

from benchmarks.harness import latency_summary, select_queries
from pipeline.retriever import Retriever


def load_test(searcher: Searcher, queries: Sequence[str], concurrency: int, k: int = 10) -> dict:
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    latencies: list[float] = []
    lock = threading.Lock()

    def one(query: str) -> None:
        start = time.perf_counter()
        searcher.search(query, k)
        elapsed = (time.perf_counter() - start) * 1000.0
        with lock:
            latencies.append(elapsed)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, queries))
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "queries": len(queries), "wall_s": wall,
            "queries_per_s": len(queries) / wall, "latency_ms": latency_summary(latencies)}


def load_table(rows: list[dict]) -> str:
    lines = ["| clients | queries | queries/s | p50 ms | p95 ms | p99 ms |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lat = r["latency_ms"]
        lines.append(f"| {r['concurrency']} | {r['queries']} | {r['queries_per_s']:.2f} | {lat['p50']:.0f} | "
                     f"{lat['p95']:.0f} | {lat['p99']:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", help="default: data.dev_split")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("-k", type=int, default=10)
    add_config_args(parser)
    args = parser.parse_args(argv)
    run = load_section(args.config, "run", RunConfig, args.overrides)
    data = load_section(args.config, "data", DataConfig, args.overrides)
    dataset = Dataset.from_dir(data.root, args.split or data.dev_split)
    queries = [text for _, text in select_queries(dataset, args.queries, run.seed)]
    retriever = Retriever(run.dir)
    retriever.warmup()
    rows = [load_test(retriever, queries, c, args.k) for c in args.concurrency]
    print(load_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
