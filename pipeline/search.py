"""Search a built run from the command line.

    python -m pipeline.search "what is the capital of australia" [-k 10] [--run DIR] [--depth N] [--json]
    python -m pipeline.search            # an interactive prompt

Exit codes: 0 answered, 2 bad input (an empty query, k <= 0), 1 a missing or inconsistent run.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Sequence

from irbase.artifacts import ArtifactError


def _print(response, as_json: bool, width: int = 110) -> None:
    if as_json:
        print(json.dumps({"results": [asdict(r) for r in response.results], "timings_ms": response.timings_ms,
                          "reranked": response.reranked, "depth": response.depth,
                          "cut_by_deadline": response.cut_by_deadline}, ensure_ascii=False))
        return
    for rank, r in enumerate(response.results, 1):
        snippet = " ".join(r.document_text.split())
        snippet = snippet if len(snippet) <= width else snippet[: width - 3] + "..."
        print(f"{rank:>3}. {r.document_id:>10}  {r.score:9.4f}  {snippet}")
    t = response.timings_ms
    steps = ", ".join(f"{name} {ms:.1f}" for name, ms in t.items() if name != "total")
    print(f"  {t['total']:.0f} ms: {steps} ({response.reranked}/{response.depth} candidates reranked"
          f"{', cut by the deadline' if response.cut_by_deadline else ''})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query", nargs="?", help="omit for an interactive prompt")
    parser.add_argument("-k", type=int, default=10, help="results to print (default 10)")
    parser.add_argument("--run", help="run directory (default: $MSMARCO_RERANK_RUN or runs/mini)")
    parser.add_argument("--depth", type=int, help="candidates to rerank (default: the run's chosen depth)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if args.k <= 0:
        parser.error(f"-k must be positive, got {args.k}")
    if args.depth is not None and args.depth < 0:
        parser.error(f"--depth must be >= 0, got {args.depth}")
    if args.query is not None and not args.query.strip():
        print("error: the query is empty", file=sys.stderr)
        return 2
    from pipeline.retriever import Retriever

    try:
        retriever = Retriever(args.run, depth=args.depth)
    except (ArtifactError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # The first searches pay page faults of the memory-mapped index and onnxruntime's first runs: untimed here,
    # or a one-shot query would run out of its budget before reranking (measured: 911 ms, nothing reranked).
    retriever.warmup()
    if args.query is not None:
        _print(retriever.search_detailed(args.query, args.k), args.json)
        return 0
    while True:
        try:
            query = input("query> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if query.strip():
            _print(retriever.search_detailed(query, args.k), args.json)


if __name__ == "__main__":
    sys.exit(main())
