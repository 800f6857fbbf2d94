"""Passage texts on disk (SQLite): fetched by id in one batched read per search, so a collection of
millions of passages never has to sit in memory. One connection per thread, read-only."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from irbase.artifacts import ArtifactError, atomic_path

SCHEMA_VERSION = 1


class PassageStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"passage store {self.path} not found")
        self._local = threading.local()
        meta = dict(self._connection().execute("SELECT key, value FROM meta").fetchall())
        if int(meta.get("schema", -1)) != SCHEMA_VERSION:
            raise ArtifactError(f"{self.path}: passage store schema {meta.get('schema')}, expected {SCHEMA_VERSION}")
        self.collection = meta.get("collection", "")
        self.count = int(meta["count"])

    @staticmethod
    def build(path: str | Path, passages: Iterable[tuple[str, str]], collection: str, total: int | None = None,
              batch: int = 10_000) -> "PassageStore":
        """Write the whole store to a temporary file and rename it: never a half-written store."""
        with atomic_path(path) as tmp:
            db = sqlite3.connect(tmp)
            db.execute("PRAGMA journal_mode=OFF")
            db.execute("PRAGMA synchronous=OFF")
            db.execute("CREATE TABLE passages (id TEXT PRIMARY KEY, text TEXT NOT NULL) WITHOUT ROWID")
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            rows, count = [], 0
            for pid, text in tqdm(passages, total=total, desc="passage store", unit="passage"):
                rows.append((pid, text))
                if len(rows) >= batch:
                    db.executemany("INSERT INTO passages VALUES (?, ?)", rows)
                    count, rows = count + len(rows), []
            db.executemany("INSERT INTO passages VALUES (?, ?)", rows)
            count += len(rows)
            db.executemany("INSERT INTO meta VALUES (?, ?)", [("schema", str(SCHEMA_VERSION)),
                                                             ("collection", collection), ("count", str(count))])
            db.commit()
            db.close()
        return PassageStore(path)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            self._local.db = db
        return db

    def get_many(self, ids: Sequence[str]) -> dict[str, str]:
        """Texts of `ids` in one query (chunked under SQLite's variable limit); unknown ids are absent."""
        out: dict[str, str] = {}
        db = self._connection()
        for start in range(0, len(ids), 900):
            chunk = list(ids[start:start + 900])
            marks = ",".join("?" * len(chunk))
            out.update(db.execute(f"SELECT id, text FROM passages WHERE id IN ({marks})", chunk).fetchall())
        return out

    def __len__(self) -> int:
        return self.count
