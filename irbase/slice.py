"""A small, self-consistent slice of a dataset, for smoke runs that finish in minutes.

    python -m irbase.slice --config configs/smoke.yaml

Keeps the first `train_queries` judged train queries and `dev_queries` dev queries (sorted ids), every
passage they judge, their official negatives, and `random_passages` more drawn with the seed; writes the
MS MARCO layout into `data.root`. The source is read only; the slice is written atomically.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from irbase.artifacts import atomic_dir, atomic_write_json, file_fingerprint
from irbase.config import add_config_args, load_section
from irbase.dataset import Dataset
from irbase.runconfig import DataConfig, RunConfig

MANIFEST = "slice.json"


@dataclass
class SliceConfig:
    source: str = "../shared/data/msmarco-mini"
    train_queries: int = 48
    dev_queries: int = 16
    random_passages: int = 400
    negatives_per_query: int = 4     # from the source's negatives.train.tsv, when it has one


def _write_tsv(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write("\t".join(str(c) for c in row) + "\n")


def _official_negatives(path: Path, collection: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                qid, pid = line.rstrip("\n").split("\t")[:2]
                if pid in collection:
                    out.setdefault(qid, []).append(pid)
    return out


def make_slice(config: SliceConfig, dest: str | Path, train_split: str = "train", dev_split: str = "dev",
               seed: int = 13) -> Path:
    dest = Path(dest)
    wanted = {"config": vars(config), "seed": seed, "splits": [train_split, dev_split],
              "source": file_fingerprint(Dataset.from_dir(config.source, train_split).collection_path)}
    if (dest / MANIFEST).is_file():
        if json.loads((dest / MANIFEST).read_text(encoding="utf-8")) == wanted:
            return dest
    train, dev = Dataset.from_dir(config.source, train_split), Dataset.from_dir(config.source, dev_split)
    official = _official_negatives(Path(config.source) / "negatives.train.tsv", train.collection)
    judged = sorted(q for q, grades in train.qrels.items() if any(r > 0 for r in grades.values()))
    # queries with official negatives first, so the slice exercises that file too
    train_q = sorted(judged, key=lambda q: (q not in official, q))[: config.train_queries]
    dev_q = sorted(dev.qrels)[: config.dev_queries]
    keep = {p for q in train_q for p in train.qrels[q]} | {p for q in dev_q for p in dev.qrels[q]}
    negatives = [(q, p) for q in train_q for p in official.get(q, [])[: config.negatives_per_query]]
    keep |= {p for _, p in negatives}
    rng = random.Random(seed)
    rest = sorted(set(train.collection) - keep)
    keep |= set(rng.sample(rest, min(config.random_passages, len(rest))))
    with atomic_dir(dest) as tmp:
        _write_tsv(tmp / "collection.tsv", [(p, train.collection[p]) for p in sorted(keep)])
        for split, ds, qids in ((train_split, train, train_q), (dev_split, dev, dev_q)):
            _write_tsv(tmp / f"queries.{split}.tsv", [(q, ds.all_queries[q]) for q in qids])
            _write_tsv(tmp / f"qrels.{split}.tsv", [(q, 0, p, r) for q in qids for p, r in ds.qrels[q].items()])
        _write_tsv(tmp / "negatives.train.tsv", negatives)
        atomic_write_json(tmp / MANIFEST, wanted)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m irbase.slice", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)
    config = load_section(args.config, "slice", SliceConfig, args.overrides)
    data = load_section(args.config, "data", DataConfig, args.overrides)
    run = load_section(args.config, "run", RunConfig, args.overrides)
    if Path(data.root).resolve() == Path(config.source).resolve():
        raise SystemExit(f"data.root {data.root} is the slice's source: point it at a new folder")
    out = make_slice(config, data.root, data.train_split, data.dev_split, run.seed)
    print(f"slice of {config.source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
