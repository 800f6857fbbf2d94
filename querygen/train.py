"""Fine-tune the query generator (passage -> query) on the real train pairs with DeepSpeed, then report
its held-out query NLL per token before and after.

    python -m querygen.train --config configs/mini.yaml [section.key=value ...]
    deepspeed --num_gpus 4 --module querygen.train --config configs/msmarco.yaml

Writes <run.dir>/<querygen.name>/: model/ (backbone + sliced head + tokenizer + querygen.json),
checkpoints/ (resumed from automatically), train_log.jsonl, holdout.tsv (the held-out train query ids,
never trained on) and eval.json.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from irbase.artifacts import atomic_write_json, atomic_write_text, file_fingerprint
from irbase.config import load_section
from irbase.dataset import Dataset
from irbase.runconfig import DataConfig, RunConfig, seed_everything
from irbase.training import TrainConfig, Trainer, train_main

from querygen.data import GeneratorBatches, HoldoutConfig, PromptEncoder, split_holdout, vocab_ids, vocab_map
from querygen.generate import GenerateConfig
from querygen.filter import FilterConfig
from querygen.model import GeneratorConfig, QueryGenerator

log = logging.getLogger(__name__)


@dataclass
class QueryGenRecipe:
    name: str = "querygen"                  # subdirectory of run.dir
    model: GeneratorConfig = field(default_factory=GeneratorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig)
    eval_pairs: int = 200                   # held-out pairs scored for the NLL before and after training
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)


def load_recipe(config_path: str | None, overrides: Sequence[str]) -> tuple[RunConfig, DataConfig, QueryGenRecipe]:
    return (load_section(config_path, "run", RunConfig, overrides),
            load_section(config_path, "data", DataConfig, overrides),
            load_section(config_path, "querygen", QueryGenRecipe, overrides))


def training_part(recipe: QueryGenRecipe) -> dict:
    """The settings that decide the trained generator (generation and filtering settings do not)."""
    return {k: v for k, v in asdict(recipe).items() if k not in ("generate", "filter")}


def heldout_nll(model: QueryGenerator, batches: GeneratorBatches, held: dict[str, list[str]], pairs: int,
                batch_size: int = 16) -> float:
    """Mean NLL per query token (over the sliced vocabulary) of the first `pairs` held-out pairs."""
    qids = sorted(held)[:pairs]
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(qids), batch_size):
        chunk = [(batches.passages[held[q][0]], batches.queries[q]) for q in qids[start:start + batch_size]]
        loss, n = model.token_nll(batches.batch(chunk))
        total, count = total + loss, count + n
    return total / max(count, 1)


def train(config_path: str | None, overrides: Sequence[str]) -> Path:
    run, data, recipe = load_recipe(config_path, overrides)
    seed_everything(run.seed)
    out = Path(run.dir) / recipe.name
    train_set = Dataset.from_dir(data.root, data.train_split)
    passages, queries = train_set.collection, train_set.all_queries
    positives, held = split_holdout(train_set.qrels, queries, passages, recipe.holdout)
    atomic_write_text(out / "holdout.tsv", "".join(f"{q}\n" for q in sorted(held)))
    log.info("%d train queries, %d held out", len(positives), len(held))

    from irbase.lm import load_tokenizer, resolve
    tokenizer = load_tokenizer(resolve(recipe.model.base_lm))
    encoder = PromptEncoder(tokenizer, recipe.model.prompt, recipe.model.passage_max_tokens,
                            recipe.model.query_max_tokens)
    vocab = vocab_ids(tokenizer, list(passages.values()) + list(queries.values()), encoder)
    model = QueryGenerator.from_base(recipe.model, vocab)
    mapping = vocab_map(vocab, len(tokenizer))
    source = GeneratorBatches(positives, queries, passages, encoder, mapping, recipe.train.batch_size, run.seed)
    log.info("sliced head: %d of %d tokens", len(vocab), len(tokenizer))
    before = heldout_nll(model, source, held, recipe.eval_pairs)
    start = time.perf_counter()
    trainer = Trainer(model, recipe.train, out, source, run_info={"recipe": training_part(recipe), "seed": run.seed})
    trained = trainer.train()
    train_seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", 0)) != 0:
        return out
    after = heldout_nll(trained, source, held, recipe.eval_pairs)
    trained.save(out / "model", extra={"recipe": training_part(recipe), "seed": run.seed, "vocab_size": len(vocab),
                                       "train_collection": file_fingerprint(train_set.collection_path),
                                       "stream_position": trainer.stream_position})
    summary = {"train_seconds": train_seconds, "train_queries": len(positives), "heldout_queries": len(held),
               "vocab": len(vocab), "heldout_nll_before": before, "heldout_nll_after": after,
               "eval_pairs": min(recipe.eval_pairs, len(held))}
    atomic_write_json(out / "eval.json", summary)
    print(f"held-out query NLL/token {before:.3f} -> {after:.3f}; trained in {train_seconds / 60:.1f} min "
          f"-> {out / 'model'}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return train_main("python -m querygen.train", __doc__, train, argv)


if __name__ == "__main__":
    sys.exit(main())
