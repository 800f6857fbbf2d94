"""Train the cross-encoder with DeepSpeed, then measure it reranking BM25's top candidates on dev.

    python -m crossencoder.train --config configs/mini.yaml [section.key=value ...]
    deepspeed --num_gpus 4 --module crossencoder.train --config configs/msmarco.yaml

Writes <run.dir>/<crossencoder.name>/: model/ (HF backbone + head + tokenizer + pair format),
checkpoints/ (resumed from automatically), train_log.jsonl, eval.json, and dev_rerank.trec with
dev_rerank_bm25.trec (the reranked dev run and its BM25 candidates, for `python -m benchmarks.paired`;
`python -m crossencoder.evaluate --model DIR` measures a saved model again into eval-dev_rerank.json).
"""
from __future__ import annotations

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
from irbase.examples import NegativesConfig, SyntheticConfig, TrainExamples, load_negative_lists, with_synthetic
from irbase.runconfig import DataConfig, RunConfig, fill_path, seed_everything
from irbase.training import TrainConfig, Trainer, train_main

from crossencoder.data import GroupBatches
from crossencoder.evaluate import Bf16Scorer, RerankEvalConfig, evaluate_on_bm25
from crossencoder.model import CrossEncoder, CrossEncoderConfig

log = logging.getLogger(__name__)


@dataclass
class CrossEncoderRecipe:
    name: str = "crossencoder"              # subdirectory of run.dir
    model: CrossEncoderConfig = field(default_factory=CrossEncoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init_from: str | None = None            # HF backbone folder we fine-tuned from the same base LM ({run_dir})
    negatives: NegativesConfig = field(default_factory=lambda: NegativesConfig(per_query=7))  # G-1
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    max_train_queries: int | None = None    # a slice, for smoke runs
    eval: RerankEvalConfig = field(default_factory=RerankEvalConfig)
    final_eval: bool = True


def train(config_path: str | None, overrides: Sequence[str]) -> Path:
    run = load_section(config_path, "run", RunConfig, overrides)
    data = load_section(config_path, "data", DataConfig, overrides)
    recipe = load_section(config_path, "crossencoder", CrossEncoderRecipe, overrides)
    seed_everything(run.seed)
    out = Path(run.dir) / recipe.name
    train_set = Dataset.from_dir(data.root, data.train_split)
    negative_lists = load_negative_lists(recipe.negatives.files, run.dir, data.root, "crossencoder.negatives.files")
    queries, qrels, added = with_synthetic(train_set.all_queries, train_set.qrels, recipe.synthetic, run.dir,
                                           data.root, run.seed)
    examples = TrainExamples.build(queries, qrels, train_set.collection, negative_lists,
                                   recipe.negatives, run.seed, recipe.max_train_queries)
    log.info("%d training queries (%d synthetic), groups of %d", len(examples), added, recipe.negatives.per_query + 1)

    init_from = fill_path(recipe.init_from, run.dir, data.root) if recipe.init_from else None
    model = CrossEncoder.from_base(recipe.model, run.seed, init_from)
    source = GroupBatches(examples, recipe.train.batch_size, model.pairs)
    start = time.perf_counter()
    run_info = {"recipe": asdict(recipe), "seed": run.seed}
    trained = Trainer(model, recipe.train, out, source, run_info=run_info).train()
    train_seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", 0)) != 0:
        return out
    trained.save(out / "model", extra={"recipe": asdict(recipe), "seed": run.seed,
                                       "train_collection": file_fingerprint(train_set.collection_path)})
    summary = {"train_seconds": train_seconds, "train_queries": len(examples)}
    if recipe.final_eval:
        summary.update(evaluate_on_bm25(Bf16Scorer(trained), config_path, overrides, recipe.eval, out))
    atomic_write_json(out / "eval.json", summary)
    print(f"trained in {train_seconds / 60:.1f} min -> {out / 'model'}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return train_main("python -m crossencoder.train", __doc__, train, argv)


if __name__ == "__main__":
    sys.exit(main())
