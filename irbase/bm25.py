"""BM25 first stage (bm25s, English stemming and stop words): the baseline, and the first source of
hard negatives for training.

    python -m irbase.bm25 index --config configs/mini.yaml
    python -m irbase.bm25 search --config configs/mini.yaml -q "what is the capital of australia"
    python -m irbase.bm25 mine --config configs/mini.yaml --out runs/mini/negatives.bm25.tsv
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import bm25s
import bm25s.selection
import numpy as np
import Stemmer
from bm25s.utils.corpus import JsonlCorpus
from tqdm import tqdm

from irbase.artifacts import (ArtifactError, atomic_dir, check_inputs, file_fingerprint, read_manifest,
                              verify_files, write_manifest)
from irbase.config import add_config_args, load_section
from irbase.dataset import Dataset, add_dataset_args, dataset_from_args
from irbase.negatives import write_negatives
from irbase.runconfig import DataConfig, RunConfig
from irbase.search import Result, RowLookup, check_query

log = logging.getLogger(__name__)
KIND = "bm25"
HINT = "python -m irbase.bm25 index --config configs/mini.yaml"


@dataclass
class BM25Config:
    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    stemmer: str | None = "english"
    stopwords: str | None = "en"
    mine_depth: int = 50
    # doc2query--: a `python -m querygen.filter` decisions.tsv ({run_dir}, {data_root}); each passage is
    # indexed with its generated queries appended, while the index still returns the passage's own text
    expansion: str | None = None
    expansion_keep: list[str] = field(default_factory=lambda: ["kept", "round-trip"])  # decisions appended


def index_dir(run_dir: str | Path, config: BM25Config) -> Path:
    """Where a run keeps this BM25 index: plain and expanded indexes live side by side."""
    return Path(run_dir) / ("bm25-expanded" if config.expansion else "bm25")


def read_expansions(path: str | Path, keep: Sequence[str]) -> dict[str, list[str]]:
    """pid -> the generated queries whose decision is in `keep`, from a decisions file
    (`qid  pid  rank  decision  query`)."""
    from irbase.formats import LineErrors, iter_lines

    path, wanted = Path(path), set(keep)
    errors, expansions = LineErrors(path), {}
    for number, line in iter_lines(path, errors):
        parts = line.split("\t")
        if len(parts) != 5:
            errors(number, f"expected 5 tab-separated columns (qid, pid, rank, decision, query), found {len(parts)}")
            continue
        if parts[3] in wanted:
            expansions.setdefault(parts[1], []).append(parts[4])
    return expansions


class BM25Index:
    """A bm25s index plus the passage ids and texts it returns, all memory-mapped after load."""

    def __init__(self, retriever: bm25s.BM25, pids: np.ndarray, texts: Sequence, config: BM25Config):
        self.retriever, self.pids, self.texts, self.config = retriever, pids, texts, config
        self.rows = RowLookup(pids, "BM25 index")  # passage ids -> rows of `scores`
        self._local = threading.local()  # PyStemmer objects are not thread-safe

    @classmethod
    def build(cls, passages: Iterable[tuple[str, str]], config: BM25Config,
              expansions: dict[str, list[str]] | None = None) -> "BM25Index":
        """Index `passages`; with `expansions`, a passage's terms are its text plus those texts, while the
        texts it returns stay the passages' own."""
        pids, texts = [], []
        for pid, text in passages:
            pids.append(pid)
            texts.append(text)
        index = cls(bm25s.BM25(k1=config.k1, b=config.b, method=config.method), np.asarray(pids), texts, config)
        indexed = texts if not expansions else [" ".join([text, *expansions.get(pid, ())])
                                                for pid, text in zip(pids, texts)]
        tokens = bm25s.tokenize(indexed, stopwords=config.stopwords or None, stemmer=index._stemmer(),
                                show_progress=True)
        index.retriever.index(tokens, show_progress=True)
        return index

    def _stemmer(self):
        if self.config.stemmer is None:
            return None
        if not hasattr(self._local, "stemmer"):
            self._local.stemmer = Stemmer.Stemmer(self.config.stemmer)
        return self._local.stemmer

    def save(self, run_dir: str | Path, inputs: dict[str, str]) -> None:
        """Write index, ids, texts and manifest (with each file's size and sha256) into a temporary directory,
        then swap it in."""
        with atomic_dir(run_dir) as tmp:
            corpus = ({"id": str(pid), "text": text} for pid, text in zip(self.pids, self.texts))
            self.retriever.save(tmp, corpus=corpus, show_progress=False)
            np.save(tmp / "pids.npy", self.pids)
            write_manifest(tmp, KIND, asdict(self.config), inputs,
                           files=[f.name for f in tmp.iterdir() if f.is_file()])

    @classmethod
    def load(cls, run_dir: str | Path, expected_inputs: dict[str, str] | None = None,
             verify: bool = True) -> "BM25Index":
        """Memory-map a saved index, refusing one whose files changed since the save (a changed score array
        ranks silently wrong). Sizes are always checked, the sha256 with `verify` (it reads every file:
        some 4 s for the full MS MARCO index with its texts); manifests older than the checksums have none."""
        run_dir = Path(run_dir)
        manifest = read_manifest(run_dir, KIND, hint=HINT)
        if expected_inputs:
            check_inputs(run_dir, manifest, expected_inputs)
        verify_files(run_dir, manifest.get("files", {}), verify, hint=f"rebuild it with: {HINT}")
        try:
            retriever = bm25s.BM25.load(str(run_dir), mmap=True, show_progress=False)
            pids = np.load(run_dir / "pids.npy", mmap_mode="r")
            texts = JsonlCorpus(str(run_dir / "corpus.jsonl"), show_progress=False, verbosity=0)
        except (ValueError, OSError, EOFError, KeyError) as e:  # bm25s and numpy name no file
            raise ArtifactError(f"{_damaged(run_dir)} is damaged ({e}); rebuild it with: {HINT}") from e
        return cls(retriever, pids, texts, BM25Config(**manifest["config"]))

    def text(self, i: int) -> str:
        doc = self.texts[i]
        return doc["text"] if isinstance(doc, dict) else doc

    def _tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        return bm25s.tokenize(list(texts), stopwords=self.config.stopwords or None, stemmer=self._stemmer(),
                              return_ids=False, show_progress=False)

    def search_ids(self, queries: Sequence[str], k: int, threads: int = 0,
                   progress: bool = False) -> list[list[tuple[str, float]]]:
        """Top-k `(pid, score)` per query; passages with score 0 match no query term and are dropped."""
        k = min(k, len(self.pids))
        docs, scores = self.retriever.retrieve(self._tokenize(queries), k=k, n_threads=threads,
                                               show_progress=progress)
        return [[(str(self.pids[d]), float(s)) for d, s in zip(row_d, row_s) if s > 0]
                for row_d, row_s in zip(docs, scores)]

    def scores(self, query: str) -> np.ndarray:
        """Every passage's BM25 score for the query, in index row order: score fusion takes both the top k
        (`top_ids`) and the scores of the bi-encoder's candidates (`rows`) from this one pass."""
        tokens = self._tokenize([query])[0]
        if not tokens:
            return np.zeros(len(self.pids), dtype=np.float32)
        return self.retriever.get_scores(tokens)

    def top_ids(self, scores: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The top k of `scores` as `search_ids` returns them (bm25s's own top-k selection)."""
        top, rows = bm25s.selection.topk(scores, k=min(k, len(self.pids)), sorted=True, backend="auto")
        return [(str(self.pids[r]), float(v)) for r, v in zip(rows, top) if v > 0]

    def score_ids(self, query: str, pids: Sequence[str]) -> np.ndarray:
        """BM25 scores of these passages for the query (0 where no term matches)."""
        rows = self.rows(pids)
        return np.asarray(self.scores(query)[rows], dtype=np.float32) if len(rows) else np.zeros(0, np.float32)

    def search(self, query: str, k: int) -> list[Result]:
        check_query(query, k)
        k = min(k, len(self.pids))
        docs, scores = self.retriever.retrieve(self._tokenize([query]), k=k, show_progress=False)
        return [Result(str(self.pids[d]), self.text(int(d)), float(s))
                for d, s in zip(docs[0], scores[0]) if s > 0]


def _damaged(run_dir: Path) -> Path:
    """The first array of an index (saved without checksums) that does not even map, else the directory."""
    for path in sorted(run_dir.glob("*.npy")):
        try:
            np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError):
            return path
    return run_dir


def resolved(config: BM25Config, run_dir: str, data_root: str) -> BM25Config:
    """`config` with its expansion path template filled in."""
    from irbase.runconfig import fill_path

    if config.expansion:
        config.expansion = fill_path(config.expansion, run_dir, data_root)
    return config


def configured(config_path: str | None, overrides: Sequence[str], plain: bool = False) -> tuple[BM25Config, Path]:
    """The recipe's BM25 config (expansion path filled in) and the run directory its index lives in. `plain`
    drops the expansion: the training evaluations draw fixed candidates from the passages alone, so their
    figures do not move with (or wait for) the generated queries."""
    run = load_section(config_path, "run", RunConfig, overrides)
    data = load_section(config_path, "data", DataConfig, overrides)
    config = resolved(load_section(config_path, "bm25", BM25Config, overrides), run.dir, data.root)
    if plain:
        config = replace(config, expansion=None)
    return config, index_dir(run.dir, config)


def collection_inputs(dataset: Dataset) -> dict[str, str]:
    return {"collection": file_fingerprint(dataset.collection_path)}


def expansion_inputs(config: BM25Config) -> dict[str, str]:
    if config.expansion and not Path(config.expansion).is_file():
        raise FileNotFoundError(f"bm25.expansion: {config.expansion} not found (the query filter writes it: "
                                "python -m querygen.filter --config configs/mini.yaml; bm25.expansion=null for "
                                "plain BM25)")
    return {"expansion": file_fingerprint(config.expansion)} if config.expansion else {}


def build_or_load(run_dir: str | Path, dataset: Dataset, config: BM25Config) -> BM25Index:
    """Load the index in `run_dir` if it was built from this collection (and expansion file) with this
    config, else build it. `config.expansion` must already be a path (`fill_path`)."""
    run_dir = Path(run_dir)
    inputs = {**collection_inputs(dataset), **expansion_inputs(config)}
    if (run_dir / "manifest.json").is_file():
        index = BM25Index.load(run_dir, collection_inputs(dataset))  # another collection is refused
        recorded = read_manifest(run_dir, KIND)["inputs"].get("expansion")
        if index.config == config and recorded == inputs.get("expansion"):
            return index
        log.info("BM25 config or expansion changed (%s -> %s): rebuilding %s", index.config, config, run_dir)
    start = time.perf_counter()
    expansions = read_expansions(config.expansion, config.expansion_keep) if config.expansion else None
    index = BM25Index.build(dataset.iter_collection(), config, expansions)
    index.save(run_dir, inputs)
    log.info("built BM25 index of %d passages in %.1f s -> %s", len(index.pids), time.perf_counter() - start, run_dir)
    return BM25Index.load(run_dir, inputs)


def mine_negatives(index: BM25Index, queries: dict[str, str], qrels: dict[str, dict[str, int]],
                   depth: int, out: str | Path, threads: int = 0) -> int:
    """Write `qid pid rank score` for each judged query's top-`depth` passages that are not its positives."""
    judged = [(qid, queries[qid]) for qid in qrels if qid in queries]

    def ranked():
        batch = 1024
        for start in tqdm(range(0, len(judged), batch), desc="mining BM25 negatives", unit="batch"):
            chunk = judged[start:start + batch]
            max_pos = max(len(qrels[qid]) for qid, _ in chunk)
            hits = index.search_ids([text for _, text in chunk], depth + max_pos, threads=threads)
            yield from zip((qid for qid, _ in chunk), hits)

    return write_negatives(out, ranked(), qrels, depth)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m irbase.bm25", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [("index", "build the index of the collection (skipped when up to date)"),
                            ("search", "print the top results for one query"),
                            ("mine", "write top-k BM25 negatives (minus positives) for each train query")]:
        sub = commands.add_parser(name, help=help_text)
        add_config_args(sub)
        sub.add_argument("--run", help="BM25 run directory (default: <run.dir>/bm25)")
        if name == "search":
            sub.add_argument("--query", "-q", required=True)
            sub.add_argument("-k", type=int, default=10, help="results to print (default: %(default)s)")
        else:
            add_dataset_args(sub, split=None)
        if name == "mine":
            sub.add_argument("--out", help="default: <run.dir>/negatives.bm25.tsv")
            sub.add_argument("--threads", type=int, default=-1,
                             help="bm25s retrieval processes (-1: all cores, 0: in this process)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = load_section(args.config, "data", DataConfig, args.overrides)
    run = load_section(args.config, "run", RunConfig, args.overrides)
    config = resolved(load_section(args.config, "bm25", BM25Config, args.overrides), run.dir, data.root)
    run_dir = Path(args.run or index_dir(run.dir, config))

    if args.command == "search":
        for rank, r in enumerate(BM25Index.load(run_dir).search(args.query, args.k), 1):
            print(f"{rank:>3}  {r.score:7.3f}  {r.document_id:<12}  {r.document_text[:100]}")
        return 0

    args.split = args.split or (data.train_split if args.command == "mine" else data.dev_split)
    dataset = dataset_from_args(args, default_root=data.root)
    index = build_or_load(run_dir, dataset, config)
    if args.command == "mine":
        out = Path(args.out or Path(run.dir) / "negatives.bm25.tsv")
        start = time.perf_counter()
        rows = mine_negatives(index, dataset.all_queries, dataset.qrels, config.mine_depth, out, args.threads)
        print(f"wrote {rows} negatives for {len(dataset.qrels)} queries to {out} "
              f"in {time.perf_counter() - start:.1f} s")
    else:
        print(f"BM25 index of {len(index.pids)} passages in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
