"""Fit the score-fusion weights of a built run on a tuning split and write them into it.

    python -m tuning.fusion --run runs/mini --split dev-large --sample 1000 [--depth 10] [--no-write]
    python -m tuning.fusion --split dev-large --depth 10 --no-write --reranker runs/mini/exp/onnx/int8

Two grid searches, each keeping the best recall@1 (MRR@10 breaks ties), on the same queries:
1. `bm25_weight`: the hybrid first stage alone, dense inner product + w x BM25 score over the union of
   both models' top N (N = pipeline.candidates); rank fusion (rrf) over the same candidates is printed
   beside it as the baseline.
2. `rerank_weight`: that first stage's top `depth` scored by the served ONNX reranker and reordered by
   first-stage score + w x the reranker's z-scored score (w 0: the first stage alone; none: the
   reranker alone).
The chosen weights and `fusion: score` are written into the run's pipeline.json (unless --no-write), so
`Retriever()` serves them. The build runs this with --depth 0 (the BM25 weight only): tuning.sweep then
fits the reranker weight together with the depth. The grid at one depth stays here for experiments with
--reranker. Fit on a tuning split (dev-large), judge on dev. Writes fusion.json into --out (default
<run>/tuning/fusion-<split>).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from irbase.artifacts import atomic_write_json, environment
from irbase.config import add_config_args, load_section, parse_config_args
from irbase.dataset import add_dataset_args, dataset_from_args
from irbase.metrics import evaluate
from irbase.runconfig import DataConfig, RunConfig

from benchmarks.harness import select_queries
from tuning.offline import offline_runs
from tuning.provenance import provenance
from benchmarks.stats import paired_test, per_query_values
from crossencoder.runtime import OnnxReranker
from pipeline.config import RunRecord
from irbase.fusion import weighted_fusion
from pipeline.first_stages.hybrid import HybridStage
from pipeline.retriever import Retriever

log = logging.getLogger(__name__)

BM25_WEIGHTS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2)
RERANK_WEIGHTS = (0.0, 0.02, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


def _means(run: dict[str, list[str]], qrels) -> dict[str, float]:
    means = evaluate(run, {q: qrels[q] for q in run}).means
    return {m: means[m] for m in ("recall@1", "mrr@10", "recall@100")}


def _gain(a: dict[str, list[str]], b: dict[str, list[str]], qrels) -> dict[str, float]:
    """recall@1 of b minus a, paired over the same queries: what the reranker adds to the first stage."""
    judged = {q: qrels[q] for q in a}
    per_a, per_b = evaluate(a, judged).per_query, evaluate(b, judged).per_query
    qids = sorted(per_a)
    test = paired_test(per_query_values(per_b, "recall@1", qids), per_query_values(per_a, "recall@1", qids))
    return {"difference": test.difference, "low": test.low, "high": test.high, "p_value": test.p_value}


def _best(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: (r["recall@1"], r["mrr@10"]))


def fit(retriever: Retriever, queries: list[tuple[str, str]], qrels, depth: int,
        bm25_weights: Sequence[float] = BM25_WEIGHTS, rerank_weights: Sequence[float] = RERANK_WEIGHTS) -> dict:
    """Both grid searches; returns every row and the two choices."""
    hybrid = retriever.first_stage
    if not isinstance(hybrid, HybridStage):
        raise ValueError(f"{retriever.run_dir} serves the {retriever.serving.first_stage} first stage: score "
                         "fusion needs the hybrid one")
    serving = retriever.serving
    features = {}
    for qid, text in tqdm(queries, desc="first-stage features", unit="q"):
        query = retriever.query(text)
        found = hybrid.gather(query, serving.candidates)
        union, columns = hybrid.features(query, found)
        features[qid] = (union, columns, [p for p, _ in hybrid.rank_fusion(found)])
    rrf_row = {"fusion": "rrf", **_means({q: f[2] for q, f in features.items()}, qrels)}
    first_rows = []
    for w in bm25_weights:
        run = {q: [p for p, _ in weighted_fusion(u, c, hybrid.weights(w))] for q, (u, c, _) in features.items()}
        first_rows.append({"bm25_weight": w, **_means(run, qrels)})
    bm25_weight = _best(first_rows)["bm25_weight"]

    fused = {q: weighted_fusion(u, c, hybrid.weights(bm25_weight)) for q, (u, c, _) in features.items()}
    first_run = {q: [p for p, _ in ranked] for q, ranked in fused.items()}
    rerank_rows, runs = [], {}
    if depth > 0:  # the reranked head as Retriever would serve it with the fitted BM25 weight
        fitted = retriever.reconfigured(first_stage="hybrid", fusion="score", bm25_weight=bm25_weight)
        weights = [None, *rerank_weights]
        known = {}  # the first stage computed above is Retriever's when no deeper list is asked for
        if depth <= serving.candidates:
            n = serving.candidates
            known[n] = {q: ([p for p, _ in r[:n]], [s for _, s in r[:n]]) for q, r in fused.items()}
        runs = {w: run for (_, w), run in offline_runs(fitted, queries, [depth], weights, serving.candidates,
                                                       known).items()}
        rerank_rows = [{"rerank_weight": w, **_means(runs[w], qrels)} for w in weights]
    rerank_weight = _best(rerank_rows)["rerank_weight"] if rerank_rows else serving.rerank_weight
    gain = _gain(first_run, runs[rerank_weight], qrels) if rerank_rows else None
    return {"rrf": rrf_row, "first_stage": first_rows, "rerank": rerank_rows, "bm25_weight": bm25_weight,
            "rerank_weight": rerank_weight, "rerank_gain": gain}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tuning.fusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="built run directory (default: run.dir of the config)")
    parser.add_argument("--sample", type=int, default=1000, help="a fixed random subset of the judged queries")
    parser.add_argument("--depth", type=int, help="candidates reranked while fitting (default: the run's depth)")
    parser.add_argument("--bm25-weights", type=float, nargs="+", default=list(BM25_WEIGHTS))
    parser.add_argument("--rerank-weights", type=float, nargs="+", default=list(RERANK_WEIGHTS))
    parser.add_argument("--out", help="default: <run>/tuning/fusion-<split>")
    parser.add_argument("--no-write", action="store_true", help="do not write the weights into the run")
    parser.add_argument("--reranker", help="an exported reranker (<stage>/onnx/<variant>) to fit instead of "
                                           "the served one: an experiment, so only with --no-write")
    add_config_args(parser)
    add_dataset_args(parser, split="dev-large")
    return parser


def _print_fit(result: dict, retriever: Retriever, depth: int, split: str, queries: int) -> None:
    print(f"\n{split}: {queries} queries, first stage = union of dense and BM25 top "
          f"{retriever.serving.candidates}")
    print(f"rank fusion (k {retriever.serving.fusion_k}, dense weight {retriever.serving.dense_weight}): "
          f"R@1 {result['rrf']['recall@1']:.4f}  MRR@10 {result['rrf']['mrr@10']:.4f}")
    print("| bm25_weight | R@1 | MRR@10 | R@100 |\n|---:|---:|---:|---:|")
    for r in result["first_stage"]:
        mark = " <- chosen" if r["bm25_weight"] == result["bm25_weight"] else ""
        print(f"| {r['bm25_weight']} | {r['recall@1']:.4f} | {r['mrr@10']:.4f} | {r['recall@100']:.4f} |{mark}")
    if result["rerank"]:
        print(f"\ntop {depth} reranked ({retriever.serving.variant}): first-stage score + w x z(reranker)")
        print("| rerank_weight | R@1 | MRR@10 |\n|---:|---:|---:|")
        for r in result["rerank"]:
            mark = " <- chosen" if r["rerank_weight"] == result["rerank_weight"] else ""
            print(f"| {'none (reranker alone)' if r['rerank_weight'] is None else r['rerank_weight']} | "
                  f"{r['recall@1']:.4f} | {r['mrr@10']:.4f} |{mark}")
        gain = result["rerank_gain"]
        print(f"reranking at the chosen weight minus the first stage alone, recall@1: {gain['difference']:+.4f} "
              f"[{gain['low']:+.4f}, {gain['high']:+.4f}], p {gain['p_value']:.4f} (paired, same queries)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parse_config_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = load_section(args.config, "data", DataConfig, args.overrides)
    dataset = dataset_from_args(args, default_root=data.root)
    run_dir = Path(args.run or load_section(args.config, "run", RunConfig, args.overrides).dir)
    if args.depth is not None and args.depth < 0:
        parser.error("--depth must be >= 0")
    if args.reranker and not args.no_write:
        parser.error("--reranker fits weights for a reranker the run does not serve: add --no-write")
    record = RunRecord.load(run_dir)
    depth = record.serving.depth if args.depth is None else args.depth
    retriever = Retriever(run_dir, depth=depth, first_stage="hybrid")
    if args.reranker:
        retriever.reranker = OnnxReranker(args.reranker, threads=retriever.serving.threads,
                                          batch_size=retriever.serving.rerank_batch)
        retriever.serving.variant = retriever.reranker.variant  # labels and fusion.json name what was scored
    queries = select_queries(dataset, args.sample, seed=13)
    result = fit(retriever, queries, dataset.qrels, depth, args.bm25_weights, args.rerank_weights)

    _print_fit(result, retriever, depth, args.split, len(queries))
    out = Path(args.out or run_dir / "tuning" / f"fusion-{args.split}")
    out.mkdir(parents=True, exist_ok=True)
    choice = {"fusion": "score", "bm25_weight": result["bm25_weight"], "rerank_weight": result["rerank_weight"],
              "depth": depth, "variant": retriever.serving.variant, "split": args.split, "queries": len(queries),
              **({"reranker": args.reranker} if args.reranker else {}),
              **provenance("tuning.fusion", argv, {k: getattr(record.serving, k) for k in ("fusion", "bm25_weight",
                                                                                         "rerank_weight")})}
    atomic_write_json(out / "fusion.json", {**result, "choice": choice, "dataset": dataset.describe(),
                                            "environment": environment()})
    if not args.no_write:
        record.serving.first_stage, record.serving.fusion = "hybrid", "score"
        record.serving.bm25_weight, record.serving.rerank_weight = result["bm25_weight"], result["rerank_weight"]
        record.fusion_fit = choice
        record.save(run_dir)
    print(f"chosen: bm25_weight {choice['bm25_weight']}, rerank_weight {choice['rerank_weight']}"
          + ("" if args.no_write else f", written to {run_dir / 'pipeline.json'}"))
    print(f"wrote {out / 'fusion.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
