"""Held-out query NLL of the trained generator, in fp32 and with the dynamic int8 that generation uses
on a CPU (with the output head in int8 or kept fp32): int8 is ~2.8x faster there, and this says what it costs the model before it writes anything.

    python -m querygen.evaluate --config configs/mini.yaml [--pairs 200]

Writes <run.dir>/<querygen.name>/precision.json.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from irbase.artifacts import atomic_write_json
from irbase.config import add_config_args
from irbase.dataset import Dataset


def main(argv: Sequence[str] | None = None) -> int:
    from querygen.data import GeneratorBatches, PromptEncoder, split_holdout, vocab_map
    from querygen.generate import quantize
    from querygen.model import QueryGenerator
    from querygen.train import heldout_nll, load_recipe

    parser = argparse.ArgumentParser(prog="python -m querygen.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, help="held-out pairs scored (default: querygen.eval_pairs)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run, data, recipe = load_recipe(args.config, args.overrides)
    out = Path(run.dir) / recipe.name
    model = QueryGenerator.load(out / "model")
    train_set = Dataset.from_dir(data.root, data.train_split)
    _, held = split_holdout(train_set.qrels, train_set.all_queries, train_set.collection, recipe.holdout)
    encoder = PromptEncoder(model.tokenizer, model.config.prompt, model.config.passage_max_tokens,
                            model.config.query_max_tokens)
    batches = GeneratorBatches({}, train_set.all_queries, train_set.collection, encoder,
                               vocab_map(model.vocab.tolist(), len(model.tokenizer)), 1, run.seed)
    pairs = args.pairs or recipe.eval_pairs
    results = {}
    configured = recipe.generate
    variants = {"fp32": lambda: model, "int8": lambda: quantize(model),
                "int8_fp32_head": lambda: quantize(model, head=False),
                "int8_configured": lambda: quantize(model, configured.int8_head, configured.int8_keep_fp32)}
    for name, make in variants.items():
        variant = make()
        start = time.perf_counter()
        results[name] = {"nll_per_token": heldout_nll(variant, batches, held, pairs),
                         "seconds": time.perf_counter() - start}
        print(f"{name}: held-out query NLL/token {results[name]['nll_per_token']:.4f} "
              f"({results[name]['seconds']:.0f} s for {pairs} pairs)")
    results["configured"] = {"int8_head": configured.int8_head, "int8_keep_fp32": configured.int8_keep_fp32}
    for name in ("int8", "int8_fp32_head", "int8_configured"):
        results[f"{name}_minus_fp32"] = results[name]["nll_per_token"] - results["fp32"]["nll_per_token"]
    atomic_write_json(out / "precision.json", {"pairs": pairs, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
