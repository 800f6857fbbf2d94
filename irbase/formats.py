"""Readers for the official MS MARCO files and the BEIR / mteb layout.

Every reader validates as it goes: a malformed line raises `DataFormatError` naming the file and
line, or, with `lenient=True`, is skipped, counted and reported once at the end of the file.
Files may be plain or gzip-compressed (`.gz`).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, NamedTuple

log = logging.getLogger(__name__)

Qrels = dict[str, dict[str, int]]


class DataFormatError(ValueError):
    """A data file does not have the expected format; the message names file and line."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str):
        self.path, self.line = str(path), line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


@dataclass
class LineErrors:
    """Raises on the first bad line, or in lenient mode skips it and counts."""

    path: Path
    lenient: bool = False
    skipped: int = 0
    first: list[str] = field(default_factory=list)

    def __call__(self, line: int | None, message: str) -> None:
        if not self.lenient:
            raise DataFormatError(self.path, line, message)
        self.skipped += 1
        if len(self.first) < 3:
            self.first.append(f"line {line}: {message}" if line is not None else message)

    def report(self) -> None:
        if self.skipped:
            log.warning("%s: skipped %d malformed line(s) (lenient mode); first: %s",
                        self.path, self.skipped, "; ".join(self.first))


def open_binary(path: str | os.PathLike) -> IO[bytes]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_lines(path: Path, errors: LineErrors) -> Iterator[tuple[int, str]]:
    """Decoded, newline-stripped, non-blank lines with 1-based numbers; bad UTF-8 goes to `errors`. A corrupt
    or truncated gzip stream is refused even in lenient mode: nothing after it can be read."""
    number = 0
    with open_binary(path) as f:
        try:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    errors(number, f"invalid UTF-8 at byte {exc.start}")
                    continue
                line = line.rstrip("\r\n")
                if line.strip():
                    yield number, line
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise DataFormatError(path, number + 1, f"corrupt or truncated gzip stream ({exc})") from None


def _tsv(path: Path, columns: tuple[str, ...], errors: LineErrors) -> Iterator[tuple[int, list[str]]]:
    for number, line in iter_lines(path, errors):
        parts = line.split("\t")
        if len(parts) != len(columns):
            errors(number, f"expected {len(columns)} tab-separated columns ({', '.join(columns)}), "
                           f"found {len(parts)}")
            continue
        if not parts[0].strip():
            errors(number, f"empty {columns[0]}")
            continue
        yield number, parts


def _jsonl(path: Path, keys: tuple[str, ...], errors: LineErrors) -> Iterator[tuple[int, dict]]:
    for number, line in iter_lines(path, errors):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            errors(number, f"invalid JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            errors(number, "expected a JSON object")
            continue
        missing = [k for k in keys if k not in row]
        if missing:
            errors(number, f"missing key(s) {', '.join(missing)}")
            continue
        yield number, row


def _is_jsonl(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.endswith(".jsonl")


def _unique(path: Path, rows: Iterator[tuple[int, str, str]], errors: LineErrors,
            what: str) -> Iterator[tuple[str, str]]:
    seen: dict[str, int] = {}
    for number, key, text in rows:
        if key in seen:
            errors(number, f"duplicate {what} {key!r} (first at line {seen[key]})")
            continue
        seen[key] = number
        yield key, text


def iter_collection(path: str | os.PathLike, lenient: bool = False) -> Iterator[tuple[str, str]]:
    """Stream `(pid, text)` from `collection.tsv` (pid, text) or BEIR `corpus.jsonl` (_id, title, text).

    BEIR titles are prepended to the text, as the usual MS MARCO title-passage concatenation.
    Duplicate ids are checked with a set of ids only, so the 8.8M-line collection streams in bounded memory.
    """
    path = Path(path)
    errors = LineErrors(path, lenient)
    if _is_jsonl(path):
        rows = ((n, str(r["_id"]), _join_title(r.get("title"), r["text"]))
                for n, r in _jsonl(path, ("_id", "text"), errors))
    else:
        rows = ((n, p[0], p[1]) for n, p in _tsv(path, ("pid", "text"), errors))
    yield from _unique(path, rows, errors, "pid")
    errors.report()


def _join_title(title: str | None, text: str) -> str:
    return f"{title} {text}" if title else text


def read_collection(path: str | os.PathLike, lenient: bool = False) -> dict[str, str]:
    """The whole collection in memory: fine for the mini set, use `iter_collection` for the full one."""
    return dict(iter_collection(path, lenient))


def read_queries(path: str | os.PathLike, lenient: bool = False) -> dict[str, str]:
    """`qid -> text` from `queries.*.tsv` (qid, text) or BEIR `queries.jsonl` (_id, text)."""
    path = Path(path)
    errors = LineErrors(path, lenient)
    if _is_jsonl(path):
        rows = ((n, str(r["_id"]), r["text"]) for n, r in _jsonl(path, ("_id", "text"), errors))
    else:
        rows = ((n, p[0], p[1]) for n, p in _tsv(path, ("qid", "text"), errors))
    queries = dict(_unique(path, rows, errors, "qid"))
    errors.report()
    return queries


def read_qrels(path: str | os.PathLike, lenient: bool = False) -> Qrels:
    """`qid -> {pid: relevance}` from TREC qrels (`qid 0 pid rel`, tab or space separated)
    or a BEIR `qrels/<split>.tsv` (`query-id corpus-id score`, header line first)."""
    path = Path(path)
    errors = LineErrors(path, lenient)
    qrels: Qrels = {}
    first = True
    for number, line in iter_lines(path, errors):
        parts = line.split()
        header, first = first, False
        if header and len(parts) == 3 and not _is_int(parts[2]):
            continue  # BEIR header: query-id corpus-id score
        if len(parts) == 4:
            qid, _, pid, rel = parts
        elif len(parts) == 3:
            qid, pid, rel = parts
        else:
            errors(number, f"expected 4 columns (qid iteration pid relevance) or 3 (query-id corpus-id score), "
                           f"found {len(parts)}")
            continue
        if not _is_int(rel):
            errors(number, f"relevance {rel!r} is not an integer")
            continue
        judged = qrels.setdefault(qid, {})
        if pid in judged:
            errors(number, f"duplicate judgement for query {qid!r}, passage {pid!r}")
            continue
        judged[pid] = int(rel)
    errors.report()
    return qrels


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


class Triple(NamedTuple):
    query: str
    positive: str
    negative: str


def iter_triples(path: str | os.PathLike, lenient: bool = False) -> Iterator[Triple]:
    """Stream `triples.train.small.tsv` rows (query text, positive text, negative text)."""
    path = Path(path)
    errors = LineErrors(path, lenient)
    for _, parts in _tsv(path, ("query", "positive", "negative"), errors):
        yield Triple(*parts)
    errors.report()


class Top1000Row(NamedTuple):
    qid: str
    pid: str
    query: str
    passage: str


def iter_top1000(path: str | os.PathLike, lenient: bool = False) -> Iterator[Top1000Row]:
    """Stream `top1000.*` rows (qid, pid, query, passage)."""
    path = Path(path)
    errors = LineErrors(path, lenient)
    for _, parts in _tsv(path, ("qid", "pid", "query", "passage"), errors):
        yield Top1000Row(*parts)
    errors.report()
