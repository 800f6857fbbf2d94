"""results.json (everything needed to audit a figure) and report.md (what a person reads)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from irbase.artifacts import atomic_write_json, atomic_write_text, environment
from irbase.trec import write_trec_run

from benchmarks.harness import BenchmarkResult

HEADLINE = ["recall@1", "mrr@10", "ndcg@10", "recall@10", "recall@100"]
LATENCY = ["p50", "p95", "p99", "mean"]


def table(rows: list[tuple[str, BenchmarkResult]]) -> str:
    """A markdown table, one row per system; readable in a terminal too."""
    head = ["system", *HEADLINE, *(f"{p} ms" for p in LATENCY), "queries"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for name, result in rows:
        means, latency = result.evaluation.means, result.latency
        cells = [name, *(f"{means[m]:.4f}" if m in means else "-" for m in HEADLINE),
                 *(f"{latency[p]:.1f}" if p in latency else "-" for p in LATENCY),
                 str(result.evaluation.num_queries)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out_dir: str | Path, system: str, result: BenchmarkResult, *,
                  config: dict[str, Any], dataset: dict[str, Any], command: str) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    ev = result.evaluation
    atomic_write_json(out_dir / "results.json", {
        "system": system, "command": command, "dataset": dataset, "config": config,
        "environment": env, "metrics": ev.means, "num_queries": ev.num_queries,
        "queries_without_relevant": ev.no_relevant, "queries_missing_from_run": ev.missing_from_run,
        "notes": ev.notes, "latency_ms": result.latency, "extra": result.extra,
        "per_query": {qid: {**scores, "latency_ms": result.latencies_ms.get(qid)}
                      for qid, scores in ev.per_query.items()},
    })
    write_trec_run(out_dir / "run.trec", result.run, tag=system.replace(":", "_"))
    notes = "".join(f"- {n}\n" for n in ev.notes)
    atomic_write_text(out_dir / "report.md", (
        f"# {system} on `{dataset['split']}`\n\n{table([(system, result)])}\n\n"
        f"{notes}"
        f"- recall@1 is hit@1 (the share of queries whose first result is relevant); "
        f"latency is one query at a time after a warm-up, in ms.\n"
        f"- machine: {env['cpu']} ({env['cpu_count']} cores), Python {env['python']}\n"
        f"- command: `{command}`\n"
    ))
    return out_dir
