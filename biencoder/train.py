"""Train the bi-encoder with DeepSpeed, then evaluate it on dev with exact search.

    python -m biencoder.train --config configs/mini.yaml [section.key=value ...]
    deepspeed --num_gpus 4 --module biencoder.train --config configs/msmarco.yaml

Writes <run.dir>/<biencoder.name>/: model/ (HF folder + biencoder.json), checkpoints/ (resumed from
automatically), train_log.jsonl, embeddings/ (dev collection shards) and eval.json.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence


from irbase.artifacts import atomic_write_json, file_fingerprint
from irbase.config import load_section
from irbase.dataset import Dataset
from irbase.examples import (NegativesConfig, SyntheticConfig, TrainExamples, load_negative_lists, stream_fingerprint,
                             with_synthetic)
from irbase.runconfig import DataConfig, RunConfig, fill_path, seed_everything
from irbase.training import ResumeRefused, TrainConfig, Trainer, train_main

from biencoder.data import TrainBatches
from biencoder.encode import EncodeConfig, collection_inputs
from biencoder.evaluate import ProxyConfig, evaluate_exact, evaluate_proxy, proxy_bm25
from biencoder.model import CONFIG_FILE, BiEncoder, BiEncoderConfig

log = logging.getLogger(__name__)


@dataclass
class BiEncoderRecipe:
    name: str = "biencoder"                 # subdirectory of run.dir
    model: BiEncoderConfig = field(default_factory=BiEncoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    init_from: str | None = None            # continue from a trained bi-encoder (round 2; {run_dir}, {data_root})
    # with init_from: start the data stream where that run stopped, so a second round reaches the training
    # queries the first did not instead of repeating its batches (sets train.data_offset when that is 0)
    continue_data: bool = True
    max_train_queries: int | None = None    # a slice, for smoke runs
    final_eval: str = "full"                # full: encode the dev collection, exact search; proxy; none
    proxy: ProxyConfig = field(default_factory=ProxyConfig)  # for final_eval=proxy and train.eval_every


def load_recipe(config_path: str | None, overrides: Sequence[str]) -> tuple[RunConfig, DataConfig, BiEncoderRecipe]:
    return (load_section(config_path, "run", RunConfig, overrides),
            load_section(config_path, "data", DataConfig, overrides),
            load_section(config_path, "biencoder", BiEncoderRecipe, overrides))


def stream_position(model_dir: str | Path, stream: str) -> int:
    """Examples of its seeded data stream that the run which trained `model_dir` consumed, refused when
    that run drew from another stream than `stream` (other queries, seed or batch size): continuing it
    would skip the first examples of this one for nothing.

    Recorded in the model's config; models saved before that are read from their run's last checkpoint
    record (those runs always started the stream at 0)."""
    model_dir = Path(model_dir)
    saved = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    if saved.get("query_stream") not in (None, stream):
        raise ResumeRefused(f"biencoder.init_from {model_dir} trained on another query stream (other queries, seed "
                            "or batch size): continuing it would skip the start of this one; set "
                            "biencoder.continue_data=false to draw this stream from its beginning")
    recorded = saved.get("stream_position")
    if recorded is not None:
        return int(recorded)
    latest = model_dir.parent / "checkpoints" / "latest.json"
    if latest.is_file():
        return int(json.loads(latest.read_text(encoding="utf-8"))["examples"])
    raise ValueError(f"biencoder.init_from {model_dir}: no record of how far its training got (no stream_position "
                     f"in {CONFIG_FILE}, no {latest}); set biencoder.train.data_offset, or "
                     "biencoder.continue_data=false to restart the stream")


def train(config_path: str | None, overrides: Sequence[str]) -> Path:
    run, data, recipe = load_recipe(config_path, overrides)
    seed_everything(run.seed)
    out = Path(run.dir) / recipe.name
    train_set = Dataset.from_dir(data.root, data.train_split)
    dev_set = Dataset.from_dir(data.root, data.dev_split)
    negative_lists = load_negative_lists(recipe.negatives.files, run.dir, data.root, "biencoder.negatives.files")
    queries, qrels, added = with_synthetic(train_set.all_queries, train_set.qrels, recipe.synthetic, run.dir,
                                           data.root, run.seed)
    examples = TrainExamples.build(queries, qrels, train_set.collection, negative_lists, recipe.negatives, run.seed,
                                   recipe.max_train_queries)
    log.info("%d training queries (%d synthetic), %d with mined negatives", len(examples), added,
             sum(1 for v in examples.negatives.values() if v))

    stream = stream_fingerprint(examples, recipe.train.batch_size)
    if recipe.init_from:
        recipe.init_from = fill_path(recipe.init_from, run.dir, data.root)
        model = BiEncoder.load(recipe.init_from)
        model.config.temperature = recipe.model.temperature
        if recipe.continue_data and recipe.train.data_offset == 0:
            recipe.train.data_offset = stream_position(recipe.init_from, stream)
            log.info("continuing the data stream of %s after %d examples", recipe.init_from,
                     recipe.train.data_offset)
    else:
        model = BiEncoder.from_base(recipe.model, run.seed)
    source = TrainBatches(examples, recipe.train.batch_size, model.tokenize)
    if recipe.final_eval not in ("full", "proxy", "none"):
        raise ValueError(f"biencoder.final_eval {recipe.final_eval!r}: expected full, proxy or none")
    bm25 = None
    if recipe.train.eval_every or recipe.final_eval == "proxy":
        bm25 = proxy_bm25(config_path, overrides, dev_set)
    periodic = (lambda m: evaluate_proxy(m, dev_set, bm25, recipe.proxy, run.seed)) \
        if recipe.train.eval_every else None
    start = time.perf_counter()
    trainer = Trainer(model, recipe.train, out, source, periodic,
                      run_info={"recipe": asdict(recipe), "seed": run.seed})
    trained = trainer.train()
    train_seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", 0)) != 0:
        return out
    trained.save(out / "model", extra={"recipe": asdict(recipe), "seed": run.seed,
                                       "train_collection": file_fingerprint(train_set.collection_path),
                                       "stream_position": trainer.stream_position, "query_stream": stream})
    summary = {"train_seconds": train_seconds, "train_queries": len(examples)}
    if recipe.final_eval == "proxy":
        start = time.perf_counter()
        summary.update(dev_proxy=evaluate_proxy(trained, dev_set, bm25, recipe.proxy, run.seed,
                                                run_path=out / "dev_proxy.trec"),
                       dev_split=dev_set.split, eval_seconds=time.perf_counter() - start)
        print(" ".join(f"{k}={v:.4f}" for k, v in summary["dev_proxy"].items()))
    elif recipe.final_eval == "full":
        encode = load_section(config_path, "encode", EncodeConfig, overrides)
        start = time.perf_counter()
        evaluation, _ = evaluate_exact(trained, dev_set, out / "embeddings", encode,
                                       collection_inputs(dev_set, out / "model"), run_path=out / "dev.trec")
        summary.update(dev=evaluation.means, dev_split=dev_set.split, eval_seconds=time.perf_counter() - start)
        print(" ".join(f"{k}={v:.4f}" for k, v in evaluation.means.items()))
    atomic_write_json(out / "eval.json", summary)
    print(f"trained in {train_seconds / 60:.1f} min -> {out / 'model'}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return train_main("python -m biencoder.train", __doc__, train, argv)


if __name__ == "__main__":
    sys.exit(main())
