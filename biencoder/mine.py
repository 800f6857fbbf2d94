"""Mine hard negatives with a trained bi-encoder, in the BM25 mining format, for a second round.

    python -m biencoder.mine --config configs/mini.yaml [--model DIR] [--out FILE]

Searches every judged train query exactly over the collection embeddings written by training (or by
`python -m biencoder.encode`), and writes its top `--depth` passages minus its positives.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from irbase.artifacts import ArtifactError, file_fingerprint, model_fingerprint, read_manifest
from irbase.config import add_config_args, load_section
from irbase.dataset import Dataset
from irbase.negatives import write_negatives
from irbase.runconfig import DataConfig, RunConfig, stage_dir

from biencoder.encode import EncodeConfig
from biencoder.evaluate import search_queries
from biencoder.index import DenseIndex, IndexConfig
from biencoder.model import BiEncoder


def mine(model: BiEncoder, index: DenseIndex, dataset: Dataset, depth: int, out: Path, bf16: bool = True) -> int:
    queries = {qid: dataset.all_queries[qid] for qid in dataset.qrels if qid in dataset.all_queries}
    max_pos = max((len(j) for j in dataset.qrels.values()), default=0)
    ranked = search_queries(model, index, queries, depth + max_pos, bf16=bf16)
    return write_negatives(out, ranked.items(), dataset.qrels, depth)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biencoder.mine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="trained bi-encoder (default: <run.dir>/<biencoder.name>/model)")
    parser.add_argument("--embeddings", help="collection shards (default: <run.dir>/<biencoder.name>/embeddings)")
    parser.add_argument("--out", help="default: <run.dir>/negatives.biencoder.tsv")
    parser.add_argument("--depth", type=int, default=50)
    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run = load_section(args.config, "run", RunConfig, args.overrides)
    data = load_section(args.config, "data", DataConfig, args.overrides)
    encode = load_section(args.config, "encode", EncodeConfig, args.overrides)
    base = stage_dir(args.config, args.overrides, "biencoder")
    model_dir = Path(args.model or base / "model")
    shards = Path(args.embeddings or base / "embeddings")
    dataset = Dataset.from_dir(data.root, data.train_split)
    inputs = read_manifest(shards, "embeddings")["inputs"]
    if inputs.get("model") != model_fingerprint(model_dir):
        raise ArtifactError(f"{shards} was encoded by another model than {model_dir}; re-encode first")
    if inputs.get("collection") != file_fingerprint(dataset.collection_path):
        raise ArtifactError(f"{shards} encodes another collection than {dataset.collection_path}")
    out = Path(args.out or Path(run.dir) / "negatives.biencoder.tsv")
    start = time.perf_counter()
    rows = mine(BiEncoder.load(model_dir), DenseIndex.from_shards(shards, IndexConfig(kind="flat")), dataset,
                args.depth, out, encode.bf16)
    print(f"wrote {rows} negatives for {len(dataset.qrels)} queries to {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
