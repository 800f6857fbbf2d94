"""Passage texts on disk (SQLite): fetched by id in one batched read per search, so a collection of
millions of passages never has to sit in memory. One connection per thread, read-only.

Beside the store, `<name>.json` (sealed) records its size and sha256 at build, checked at load: SQLite
notices a damaged page only when a query reads it, and a changed byte inside a passage's text never."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from irbase.artifacts import ArtifactError, atomic_path, atomic_write_json, file_record, read_json, seal, verify_files

SCHEMA_VERSION = 1
KIND = "passage-store"


def record_path(path: str | Path) -> Path:
    """The store's record (size and sha256) beside it."""
    path = Path(path)
    return path.with_name(path.name + ".json")


class PassageStore:
    def __init__(self, path: str | Path, verify: bool = True):
        """Open the store, refusing one changed since its build. Its size is always checked, the sha256 with
        `verify` (it reads the whole file, a few seconds for the full MS MARCO store of some 3 GB); a store
        built before the record existed is opened as it is."""
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"passage store {self.path} not found")
        if record_path(self.path).is_file():
            record = read_json(record_path(self.path))
            if record.get("kind") != KIND:
                raise ArtifactError(f"{record_path(self.path)} is not a passage store record; rebuild the store")
            verify_files(self.path.parent, {self.path.name: record}, verify, hint="rebuild the store")
        self._local = threading.local()
        try:
            meta = dict(self._connection().execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:  # SQLite's message names no file
            raise ArtifactError(f"{self.path}: not a readable passage store ({e}); rebuild it") from e
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
            # the record goes first: a kill before the store is renamed leaves a record that no store
            # matches (refused, rebuilt), never a store without its record
            atomic_write_json(record_path(path), seal({"kind": KIND, **file_record(tmp)}))
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
