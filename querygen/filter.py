"""Filter the generated queries: degenerate and duplicate queries out, then round-trip consistency (the
source passage must rank within the first stage's top `keep_rank` for its query).

    python -m querygen.filter --config configs/mini.yaml [section.key=value ...]

Writes <run.dir>/<querygen.name>/filtered/: decisions.tsv (`qid  pid  rank  decision  query` for every
generated query; rank 0: not in the judge's top `depth`), queries.synthetic.tsv and qrels.synthetic.tsv (the kept
queries, MS MARCO layout), filter.json (kept fractions, round-trip hit@1/@5 of the synthetic queries
beside the real held-out train queries') and examples.md (random kept and dropped queries).

The decisions keep every rank, so each consumer chooses its own cut: document expansion reads them with
its own `max_rank`, since a BM25 round trip throws away exactly the queries whose words the passage lacks,
which are the ones expansion needs (shared/notes/generation-cost.md).
"""
from __future__ import annotations

import argparse
import logging
import random
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from irbase.artifacts import atomic_write_json, atomic_write_text
from irbase.config import add_config_args
from irbase.dataset import Dataset
from irbase.formats import read_qrels, read_queries

log = logging.getLogger(__name__)
SPLIT = "synthetic"
WORD = re.compile(r"[\w']+")


@dataclass
class FilterConfig:
    min_words: int = 2
    max_words: int = 20
    max_word_repeats: int = 2      # a word (of 3+ letters) more often than this: degenerate ("which which ...")
    judge: str = "bm25"            # the first stage that ranks the source passage for the round trip
    depth: int = 100               # ranks looked at; deeper sources get rank 0
    keep_rank: int | None = 20     # kept for training if the source ranks within this (null: no round trip)
    examples: int = 30             # random kept and dropped examples written to examples.md


def normalise(query: str) -> str:
    return " ".join(WORD.findall(query.lower()))


def degenerate(query: str, config: FilterConfig) -> str | None:
    """Why a query is unusable on its face, or None."""
    words = normalise(query).split()
    if len(words) < config.min_words:
        return "too-short"
    if len(words) > config.max_words:
        return "too-long"
    if any(a == b for a, b in zip(words, words[1:])):
        return "repeated-word"
    counts = Counter(w for w in words if len(w) >= 3)
    if counts and max(counts.values()) > config.max_word_repeats:
        return "repeated-word"
    bigrams = list(zip(words, words[1:]))
    if len(bigrams) != len(set(bigrams)):
        return "repeated-phrase"
    return None


def decide(queries: dict[str, str], sources: dict[str, str], ranks: dict[str, int],
           config: FilterConfig) -> dict[str, str]:
    """qid -> kept | too-short | too-long | repeated-word | repeated-phrase | duplicate | round-trip.
    A duplicate is a second query with the same normalised text for the same passage."""
    seen: set[tuple[str, str]] = set()
    decisions = {}
    for qid, text in queries.items():
        reason = degenerate(text, config)
        key = (sources[qid], normalise(text))
        if reason is None and key in seen:
            reason = "duplicate"
        seen.add(key)
        if reason is None and config.keep_rank is not None and not 0 < ranks.get(qid, 0) <= config.keep_rank:
            reason = "round-trip"
        decisions[qid] = reason or "kept"
    return decisions


def source_ranks(index, queries: dict[str, str], relevant: dict[str, set[str]], depth: int) -> dict[str, int]:
    """Rank (1-based) of the first relevant passage in the index's top `depth` per query; 0 when absent."""
    qids = list(queries)
    hits = index.search_ids([queries[q] for q in qids], depth, threads=-1, progress=True)
    ranks = {}
    for qid, ranked in zip(qids, hits):
        ranks[qid] = next((r for r, (pid, _) in enumerate(ranked, 1) if pid in relevant[qid]), 0)
    return ranks


def hit_rates(ranks: dict[str, int], cuts: Sequence[int] = (1, 5, 20)) -> dict[str, float]:
    values = list(ranks.values())
    return {f"hit@{k}": sum(1 for r in values if 0 < r <= k) / max(len(values), 1) for k in cuts}


def examples_markdown(queries: dict[str, str], sources: dict[str, str], decisions: dict[str, str],
                      passages: dict[str, str], count: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = ["# Generated queries: random kept and dropped examples", ""]
    for title, wanted in (("Kept", True), ("Dropped", False)):
        pool = sorted(q for q, d in decisions.items() if (d == "kept") == wanted)
        lines += [f"## {title} ({len(pool)} in all)", "", "| query | decision | passage (start) |", "|---|---|---|"]
        for qid in sorted(rng.sample(pool, min(count, len(pool)))):
            passage = passages[sources[qid]][:120].replace("|", "/")
            lines.append(f"| {queries[qid].replace('|', '/')} | {decisions[qid]} | {passage} |")
        lines.append("")
    return "\n".join(lines)


def run_filter(config_path: str | None, overrides: Sequence[str]) -> Path:
    from irbase.bm25 import BM25Config, build_or_load, index_dir
    from irbase.config import load_section

    from querygen.data import split_holdout
    from querygen.generate import SPLIT as GENERATED, output_dir
    from querygen.train import load_recipe

    run, data, recipe = load_recipe(config_path, overrides)
    config = recipe.filter
    if config.judge != "bm25":
        raise ValueError(f"querygen.filter.judge {config.judge!r}: the known judge is bm25")
    generated = output_dir(run.dir, recipe.name)
    queries = read_queries(generated / f"queries.{GENERATED}.tsv")
    sources = {qid: next(iter(judged)) for qid, judged in read_qrels(generated / f"qrels.{GENERATED}.tsv").items()}
    dataset = Dataset.from_dir(data.root, data.train_split)
    judge = load_section(config_path, "bm25", BM25Config, overrides)
    judge.expansion = None  # the plain index judges: an index expanded with these very queries would not
    index = build_or_load(index_dir(run.dir, judge), dataset, judge)
    ranks = source_ranks(index, queries, {q: {p} for q, p in sources.items()}, config.depth)
    decisions = decide(queries, sources, ranks, config)
    _, held = split_holdout(dataset.qrels, dataset.all_queries, dataset.collection, recipe.holdout)
    real = source_ranks(index, {q: dataset.all_queries[q] for q in held}, {q: set(p) for q, p in held.items()},
                        config.depth)
    out = Path(run.dir) / recipe.name / "filtered"
    kept = [q for q, d in decisions.items() if d == "kept"]
    atomic_write_text(out / "decisions.tsv", "".join(f"{q}\t{sources[q]}\t{ranks[q]}\t{decisions[q]}\t{text}\n"
                                                     for q, text in queries.items()))
    atomic_write_text(out / f"queries.{SPLIT}.tsv", "".join(f"{q}\t{queries[q]}\n" for q in kept))
    atomic_write_text(out / f"qrels.{SPLIT}.tsv", "".join(f"{q}\t0\t{sources[q]}\t1\n" for q in kept))
    usable = [q for q, d in decisions.items() if d in ("kept", "round-trip")]
    summary = {"config": asdict(config), "generated": len(queries), "kept": len(kept),
               "kept_fraction": len(kept) / max(len(queries), 1),
               "decisions": dict(Counter(decisions.values())),
               "round_trip_synthetic": hit_rates({q: ranks[q] for q in usable}),
               "round_trip_real_heldout": hit_rates(real), "heldout_queries": len(real)}
    atomic_write_json(out / "filter.json", summary)
    atomic_write_text(out / "examples.md", examples_markdown(queries, sources, decisions, dataset.collection,
                                                             config.examples, run.seed))
    print(f"kept {len(kept)} of {len(queries)} ({summary['kept_fraction']:.3f}); round trip (BM25) synthetic "
          f"{summary['round_trip_synthetic']}, real held-out {summary['round_trip_real_heldout']}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m querygen.filter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_filter(args.config, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
