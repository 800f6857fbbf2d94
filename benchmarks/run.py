"""Evaluate one system on one split: recall@1, MRR@10, nDCG@10, recall@100 and per-query latency.

    python -m benchmarks.run --system bm25 --data ../shared/data/msmarco-mini --split dev
    python -m benchmarks.run --system mypackage.module:Factory --split dl19

Writes results.json, report.md and run.trec into --out (default <run.dir>/benchmarks/<system>-<split>).
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Sequence

from irbase.config import add_config_args, load_section
from irbase.dataset import add_dataset_args, dataset_from_args
from irbase.runconfig import DataConfig, RunConfig

from benchmarks.harness import BenchmarkConfig, run_benchmark
from benchmarks.report import table, write_outputs
from benchmarks.systems import SYSTEMS, make_system


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", required=True,
                        help=f"one of {', '.join(SYSTEMS)}, or module:attr built with no arguments")
    parser.add_argument("--out", help="output directory")
    parser.add_argument("--min-relevance", type=int, help="grade counted as relevant (TREC DL binary: 2)")
    add_config_args(parser)
    add_dataset_args(parser, split=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data = load_section(args.config, "data", DataConfig, args.overrides)
    run = load_section(args.config, "run", RunConfig, args.overrides)
    bench = load_section(args.config, "benchmark", BenchmarkConfig, args.overrides)
    if args.min_relevance is not None:
        bench.min_relevance = args.min_relevance
    args.split = args.split or data.dev_split
    dataset = dataset_from_args(args, default_root=data.root)

    searcher, system_config = make_system(args.system, args.config, args.overrides, dataset)
    result = run_benchmark(searcher, dataset, bench)
    out = Path(args.out or Path(run.dir) / "benchmarks" / f"{args.system.replace(':', '_')}-{args.split}")
    command = "python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    write_outputs(out, args.system, result, config={"benchmark": bench, **system_config},
                  dataset=dataset.describe(), command=command)
    print(table([(args.system, result)]))
    for note in result.evaluation.notes:
        print(f"note: {note}")
    print(f"wrote {out}/results.json, report.md, run.trec")
    return 0


if __name__ == "__main__":
    sys.exit(main())
