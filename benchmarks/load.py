"""Concurrent clients against one searcher: throughput and tail latency as load grows.

    python -m benchmarks.load --config configs/mini.yaml --split dev --concurrency 1 2 4 --queries 100
    python -m benchmarks.load --url http://127.0.0.1:8000 --concurrency 1 4 16 --queries 200   # a running service

N threads share one `Retriever()` (as a web server's workers would), or with `--url` N clients drive
`python -m pipeline.serve` over HTTP, and each calls `search` for its
share of a fixed query list; latency is measured per call, wall time over the whole batch. Recall@1 is
measured too: under load the deadline makes the pipeline rerank fewer candidates, so it trades quality
for latency, and the table shows how much.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
import urllib.request
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

from irbase.config import add_config_args, load_section, parse_config_args
from irbase.dataset import Dataset
from irbase.metrics import evaluate
from irbase.runconfig import DataConfig, RunConfig
from irbase.search import Result, Searcher

from benchmarks.harness import latency_summary, select_queries
from pipeline.retriever import Retriever, SearchResponse


class HttpSearcher:
    """The service's GET /search as a Searcher: one HTTP request per query (a new connection each)."""

    def __init__(self, url: str, timeout_s: float = 30.0, depth: int | None = None):
        self.url, self.timeout_s, self.depth = url.rstrip("/"), timeout_s, depth

    def search_detailed(self, query: str, k: int) -> SearchResponse:
        params = {"q": query, "k": k}
        if self.depth is not None:
            params["depth"] = self.depth
        with urllib.request.urlopen(f"{self.url}/search?{urllib.parse.urlencode(params)}",
                                    timeout=self.timeout_s) as response:
            body = json.loads(response.read())
        return SearchResponse([Result(r["document_id"], r["document_text"], r["score"]) for r in body["results"]],
                              body["timings_ms"], body["reranked"], body["depth"], body["cut_by_deadline"])

    def search(self, query: str, k: int) -> list[Result]:
        return self.search_detailed(query, k).results


def load_test(searcher: Searcher, queries: Sequence[tuple[str, str]], concurrency: int, k: int = 10,
              qrels: Mapping[str, Mapping[str, int]] | None = None, min_relevance: int = 1) -> dict:
    """`queries` are (qid, text); with `qrels`, recall@1 of the answers given under this load. A searcher with
    `search_detailed` (the Retriever, the service) also reports how deep it reranked and how often the deadline
    cut the reranking short: under load the pacer trades depth for latency, and this shows how much."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    latencies: list[float] = []
    ranked: dict[str, list[str]] = {}
    lock = threading.Lock()

    errors: list[str] = []
    reranked: list[tuple[int, bool]] = []
    detailed = hasattr(searcher, "search_detailed")

    def one(query: tuple[str, str]) -> None:
        qid, text = query
        start = time.perf_counter()
        try:
            response = searcher.search_detailed(text, k) if detailed else SearchResponse(searcher.search(text, k))
        except (OSError, ValueError) as exc:  # an HTTP error or a dropped connection counts, and the run goes on
            with lock:
                errors.append(f"{qid}: {exc}")
            return
        elapsed = (time.perf_counter() - start) * 1000.0
        with lock:
            latencies.append(elapsed)
            ranked[qid] = [r.document_id for r in response.results]
            if detailed:
                reranked.append((response.reranked, response.cut_by_deadline))

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, queries))
    wall = time.perf_counter() - start
    row = {"concurrency": concurrency, "queries": len(queries), "wall_s": wall,
           "queries_per_s": len(queries) / wall, "latency_ms": latency_summary(latencies), "errors": len(errors),
           "first_errors": errors[:3]}
    if reranked:
        row["reranked_mean"] = sum(n for n, _ in reranked) / len(reranked)
        row["cut_share"] = sum(cut for _, cut in reranked) / len(reranked)
    if qrels is not None:
        judged = {qid: qrels[qid] for qid in ranked if qid in qrels}
        row["recall@1"] = evaluate(ranked, judged, min_relevance=min_relevance, recall_ks=(1,)).means["recall@1"]
    return row


def load_table(rows: list[dict]) -> str:
    with_recall = all("recall@1" in r for r in rows)
    with_depth = all("reranked_mean" in r for r in rows)
    header = "| clients | queries | errors | queries/s | p50 ms | p95 ms | p99 ms |"
    header += " recall@1 |" * with_recall + " reranked per query | cut by the deadline |" * with_depth
    lines = [header, "|" + "---:|" * header.count(" |")]
    for r in rows:
        lat = r["latency_ms"]
        line = (f"| {r['concurrency']} | {r['queries']} | {r.get('errors', 0)} | {r['queries_per_s']:.2f} | "
                f"{lat['p50']:.0f} | {lat['p95']:.0f} | {lat['p99']:.0f} |")
        line += f" {r['recall@1']:.3f} |" if with_recall else ""
        line += f" {r['reranked_mean']:.1f} | {r['cut_share']:.0%} |" if with_depth else ""
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", help="default: data.dev_split")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--url", help="drive a running `python -m pipeline.serve` at this URL instead of an "
                                      "in-process Retriever")
    add_config_args(parser)
    args = parse_config_args(parser, argv)
    run = load_section(args.config, "run", RunConfig, args.overrides)
    data = load_section(args.config, "data", DataConfig, args.overrides)
    dataset = Dataset.from_dir(data.root, args.split or data.dev_split)
    queries = select_queries(dataset, args.queries, run.seed)
    qrels = dataset.qrels if dataset.qrels_path is not None else None
    if args.url:
        searcher: Searcher = HttpSearcher(args.url)
    else:
        searcher = Retriever(run.dir)
        searcher.warmup()
    rows = [load_test(searcher, queries, c, args.k, qrels) for c in args.concurrency]
    print(load_table(rows))
    for r in rows:
        for error in r["first_errors"]:
            print(f"error ({r['concurrency']} clients): {error}", file=sys.stderr)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
