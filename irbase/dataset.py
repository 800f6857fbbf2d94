"""A dataset is a directory plus a split, with single files overridable, so any held-out set in the
MS MARCO or BEIR layout is evaluated without code changes."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

from irbase import formats
from irbase.formats import DataFormatError, Qrels

log = logging.getLogger(__name__)


def _first_existing(root: Path, names: list[str]) -> Path | None:
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


@dataclass
class Dataset:
    collection_path: Path
    queries_path: Path
    qrels_path: Path | None
    split: str
    lenient: bool = False
    skipped: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, root: str | os.PathLike | None, split: str, *,
                 collection: str | os.PathLike | None = None,
                 queries: str | os.PathLike | None = None,
                 qrels: str | os.PathLike | None = None,
                 lenient: bool = False) -> "Dataset":
        """Resolve a split's files in `root` (MS MARCO names first, then BEIR), overrides winning."""
        root_path = Path(root) if root is not None else None
        if root_path is not None and not root_path.is_dir():
            raise FileNotFoundError(f"data directory {root_path} not found (cwd: {Path.cwd()}); "
                                    "pass --data DIR or --collection/--queries/--qrels")

        def pick(override, names: list[str], what: str, required: bool = True) -> Path | None:
            if override is not None:
                path = Path(override)
                if not path.is_file():
                    raise FileNotFoundError(f"--{what} {path}: file not found")
                return path
            found = _first_existing(root_path, names) if root_path is not None else None
            if found is None and required:
                where = f"in {root_path}" if root_path is not None else "(no --data given)"
                raise FileNotFoundError(f"no {what} file for split {split!r} {where}; looked for "
                                        f"{', '.join(names)} (optionally .gz); pass --{what} PATH")
            return found

        collection_path = pick(collection, ["collection.tsv", "corpus.jsonl"], "collection")
        queries_path = pick(queries, [f"queries.{split}.tsv", "queries.jsonl"], "queries")
        qrels_path = pick(qrels, [f"qrels.{split}.tsv", f"qrels/{split}.tsv"], "qrels", required=False)
        return cls(collection_path, queries_path, qrels_path, split, lenient)

    def iter_collection(self) -> Iterator[tuple[str, str]]:
        return formats.iter_collection(self.collection_path, self.lenient)

    @cached_property
    def collection(self) -> dict[str, str]:
        return formats.read_collection(self.collection_path, self.lenient)

    @cached_property
    def collection_ids(self) -> frozenset[str]:
        if "collection" in self.__dict__:
            return frozenset(self.collection)
        return frozenset(pid for pid, _ in self.iter_collection())

    @cached_property
    def all_queries(self) -> dict[str, str]:
        return formats.read_queries(self.queries_path, self.lenient)

    @cached_property
    def qrels(self) -> Qrels:
        """Judgements checked against the queries and the collection: an id that names nothing is an
        error (or, lenient, dropped and counted) because it would silently deflate every metric."""
        if self.qrels_path is None:
            raise FileNotFoundError(f"no qrels for split {self.split!r}; pass --qrels PATH")
        raw = formats.read_qrels(self.qrels_path, self.lenient)
        errors = formats.LineErrors(self.qrels_path, self.lenient)
        pids, queries = self.collection_ids, self.all_queries
        clean: Qrels = {}
        for qid, judged in raw.items():
            if qid not in queries:
                errors(None, f"query {qid!r} is not in {self.queries_path}")
                continue
            kept = {}
            for pid, rel in judged.items():
                if pid not in pids:
                    errors(None, f"query {qid!r} judges passage {pid!r}, which is not in "
                                 f"{self.collection_path}")
                    continue
                kept[pid] = rel
            if kept:
                clean[qid] = kept
        errors.report()
        self.skipped["qrels"] = errors.skipped
        return clean

    @cached_property
    def queries(self) -> dict[str, str]:
        """The split's queries to evaluate: those with judgements, in queries-file order."""
        if self.qrels_path is None:
            return self.all_queries
        return {qid: text for qid, text in self.all_queries.items() if qid in self.qrels}

    def describe(self) -> dict[str, str | None]:
        return {"split": self.split, "collection": str(self.collection_path),
                "queries": str(self.queries_path),
                "qrels": str(self.qrels_path) if self.qrels_path else None}


def add_dataset_args(parser: argparse.ArgumentParser, split: str | None = "dev") -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument("--data", help="dataset directory (MS MARCO or BEIR layout)")
    group.add_argument("--split", default=split,
                       help=f"split name (default: {split or 'from the config: data.dev_split, or data.train_split to mine'})")
    group.add_argument("--collection", help="override the collection file")
    group.add_argument("--queries", help="override the queries file")
    group.add_argument("--qrels", help="override the qrels file")
    group.add_argument("--lenient", action="store_true",
                       help="skip and count malformed lines instead of stopping at the first")


def dataset_from_args(args: argparse.Namespace, default_root: str | None = None) -> Dataset:
    return Dataset.from_dir(args.data or default_root, args.split, collection=args.collection,
                            queries=args.queries, qrels=args.qrels, lenient=args.lenient)


__all__ = ["Dataset", "DataFormatError", "add_dataset_args", "dataset_from_args"]
