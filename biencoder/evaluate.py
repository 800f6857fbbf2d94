"""Exact-search effectiveness of a bi-encoder on a split: encode the collection (resumable shards),
search every judged query with `IndexFlatIP`, score with the shared metrics.

`python -m biencoder.evaluate --model DIR` re-evaluates a saved model (the fixed proxy by default, or
`--full`) and keeps its ranking as a TREC run beside the model, for `python -m benchmarks.paired`."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from irbase.artifacts import atomic_write_json
from irbase.bm25 import BM25Index, build_or_load, configured
from irbase.config import add_config_args, from_dict, load_section, load_yaml
from irbase.dataset import Dataset
from irbase.metrics import Evaluation, evaluate
from irbase.runconfig import DataConfig, RunConfig, stage_dir
from irbase.trec import write_trec_run

from biencoder.encode import EncodeConfig, collection_inputs, encode_collection
from biencoder.index import DenseIndex, IndexConfig
from biencoder.model import BiEncoder


def search_queries(model: BiEncoder, index: DenseIndex, queries: dict[str, str], k: int,
                   dim: int | None = None, bf16: bool = True) -> dict[str, list[tuple[str, float]]]:
    qids = list(queries)
    vectors = model.encode([queries[q] for q in qids], "query", batch_size=128, dim=dim, bf16=bf16)
    scores, pids = index.search(vectors, k)
    return {qid: list(zip(p, map(float, s))) for qid, p, s in zip(qids, pids, scores)}


def evaluate_exact(model: BiEncoder, dataset: Dataset, shard_dir: str | Path, encode: EncodeConfig,
                   inputs: dict[str, str], k: int = 100, run_path: str | Path | None = None
                   ) -> tuple[Evaluation, DenseIndex]:
    """`run_path`: also keep the ranking as a TREC run, so two recipes can be compared query by query."""
    passages = list(dataset.iter_collection())
    encode_collection(model, passages, shard_dir, encode, inputs, replace_stale=True)
    exact = DenseIndex.from_shards(shard_dir, IndexConfig(kind="flat"))
    run = search_queries(model, exact, dataset.queries, k, encode.dim, encode.bf16)
    if run_path is not None:
        write_trec_run(run_path, run, tag="biencoder")
    return evaluate({q: [p for p, _ in hits] for q, hits in run.items()}, dataset.qrels), exact


@dataclass
class ProxyConfig:
    """A cheap, fixed stand-in for the full dev evaluation, to compare recipes in minutes.

    A seeded sample of dev queries is searched over their judged passages, BM25's top passages for each
    (the distractors that fool BM25) and random passages (those that may fool a dense model). Scores run
    higher than on the full collection and favour BM25, whose top results are all present: compare dense
    recipes with each other on it, and confirm a winner on the full split.
    """
    queries: int = 200
    bm25_depth: int = 30
    random_passages: int = 4000


def proxy_corpus(dataset: Dataset, bm25: BM25Index, config: ProxyConfig, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    qids = sorted(dataset.queries)
    qids = [qids[i] for i in sorted(rng.choice(len(qids), min(config.queries, len(qids)), replace=False))]
    pool = {pid for q in qids for pid in dataset.qrels[q]}
    for hits in bm25.search_ids([dataset.queries[q] for q in qids], config.bm25_depth):
        pool.update(pid for pid, _ in hits)
    others = sorted(set(dataset.collection) - pool)
    extra = [others[i] for i in rng.choice(len(others), min(config.random_passages, len(others)), replace=False)]
    return qids, sorted(pool) + extra


def proxy_bm25(config_path: str | None, overrides: Sequence[str], dev: Dataset) -> BM25Index:
    """The dev BM25 index the proxy draws its distractors from (plain passages, so the proxy stays fixed when
    the served index is expanded), shared by every run of the recipe's run.dir."""
    config, index = configured(config_path, overrides, plain=True)
    return build_or_load(index, dev, config)


def evaluate_proxy(model: BiEncoder, dataset: Dataset, bm25: BM25Index, config: ProxyConfig, seed: int,
                   bf16: bool = True, run_path: str | Path | None = None) -> dict[str, float]:
    """Dense and BM25 metrics on the proxy corpus, named `proxy_*` and `proxy_bm25_*`. `run_path` keeps
    the dense ranking as a TREC run, and BM25's beside it (`<stem>_bm25.trec`), so recipes can be paired
    with each other and with BM25 on the same passages (`python -m benchmarks.paired`)."""
    qids, pids = proxy_corpus(dataset, bm25, config, seed)
    allowed = set(pids)
    collection = dataset.collection
    vectors = model.encode([collection[p] for p in pids], "passage", batch_size=64, bf16=bf16)
    index = DenseIndex.from_embeddings(vectors, pids, IndexConfig(kind="flat"))
    queries = {q: dataset.queries[q] for q in qids}
    qrels = {q: dataset.qrels[q] for q in qids}
    dense = search_queries(model, index, queries, 100, bf16=bf16)
    lexical = {q: [(p, s) for p, s in hits if p in allowed][:100]
               for q, hits in zip(qids, bm25.search_ids(list(queries.values()), len(pids)))}
    if run_path is not None:
        run_path = Path(run_path)
        write_trec_run(run_path, dense, tag="biencoder-proxy")
        write_trec_run(run_path.with_name(f"{run_path.stem}_bm25.trec"), lexical, tag="bm25-proxy")
    result = {f"proxy_{k}": v for k, v in
              evaluate({q: [p for p, _ in dense[q]] for q in qids}, qrels).means.items()}
    result.update({f"proxy_bm25_{k}": v for k, v in
                   evaluate({q: [p for p, _ in lexical[q]] for q in qids}, qrels).means.items()})
    result["proxy_passages"] = len(pids)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biencoder.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="saved bi-encoder (default: <run.dir>/<biencoder.name>/model)")
    parser.add_argument("--full", action="store_true",
                        help="encode the whole dev collection (into <model>/../embeddings) instead of the proxy")
    add_config_args(parser)
    args = parser.parse_args(argv)
    run = load_section(args.config, "run", RunConfig, args.overrides)
    data = load_section(args.config, "data", DataConfig, args.overrides)
    model_dir = Path(args.model or stage_dir(args.config, args.overrides, "biencoder") / "model")
    model = BiEncoder.load(model_dir)
    dev = Dataset.from_dir(data.root, data.dev_split)
    out = model_dir.parent
    if args.full:
        encode = load_section(args.config, "encode", EncodeConfig, args.overrides)
        evaluation, _ = evaluate_exact(model, dev, out / "embeddings", encode, collection_inputs(dev, model_dir),
                                       run_path=out / "dev.trec")
        metrics, name = evaluation.means, "dev"
    else:
        raw = load_yaml(args.config, args.overrides).get("biencoder", {}).get("proxy")
        proxy = from_dict(ProxyConfig, raw, f"{args.config}:biencoder.proxy")
        metrics = evaluate_proxy(model, dev, proxy_bm25(args.config, args.overrides, dev), proxy, run.seed,
                                 run_path=out / "dev_proxy.trec")
        name = "dev_proxy"
    atomic_write_json(out / f"eval-{name}.json", {name: metrics, "model": str(model_dir)})
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
