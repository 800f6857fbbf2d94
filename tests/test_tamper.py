"""Tampered artifacts are refused at load, with an error naming the file: each payload of a tiny served run
truncated to half its size, or with one byte flipped in the middle, then loaded as the system loads it.
Never a crash, a bare third-party error without the path, or a silently wrong answer."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from irbase.artifacts import CHECKSUM, MANIFEST, ArtifactError
from tests.conftest import QUERIES, copy_tiny_run

from biencoder.encode import iter_shards
from biencoder.index import DenseIndex, IndexConfig
from crossencoder.runtime import EXPORT_FILE
from pipeline import Retriever
from pipeline.config import RunRecord
from pipeline.store import record_path

EMBEDDINGS = "corpus/embeddings"
# (file in the run, how the system loads it): "serve" is Retriever(run), which loads the HNSW index, the
# passage store, the hybrid stage's BM25 index and the ONNX reranker; "index" is the index build's read of the
# embedding shards (python -m biencoder.index, embed_and_store_corpus)
FILES = [
    ("corpus/index/index.faiss", "serve"),
    ("corpus/index/pids.npy", "serve"),
    ("corpus/index/manifest.json", "serve"),
    ("ce/onnx/fp32/model.onnx", "serve"),
    ("ce/onnx/fp32/tokenizer.json", "serve"),
    ("corpus/passages.sqlite", "serve"),
    ("corpus/passages.sqlite.json", "serve"),
    ("corpus/bm25/data.csc.index.npy", "serve"),
    ("corpus/bm25/indices.csc.index.npy", "serve"),
    ("corpus/bm25/manifest.json", "serve"),
    (f"{EMBEDDINGS}/emb-00000.npy", "index"),
    (f"{EMBEDDINGS}/ids-00001.npy", "index"),
    (f"{EMBEDDINGS}/shard-00000.json", "index"),
    (f"{EMBEDDINGS}/manifest.json", "index"),
]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[min(int(len(data) * at), len(data) - 1)] ^= 0xFF
    path.write_bytes(bytes(data))


TAMPERS: dict[str, Callable[[Path], None]] = {"truncate": truncate, "flip": flip}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, built_tiny_run) -> Path:
    return copy_tiny_run(built_tiny_run, tmp_path_factory.mktemp("run"))


@pytest.fixture
def copy(tiny_run, tmp_path) -> Path:
    """A private copy of the run to tamper with."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def load(run: Path, how: str):
    """Load the run the way the system does for the tampered file; returns something to compare answers."""
    if how == "serve":
        retriever = Retriever(run)
        return [[(r.document_id, round(r.score, 5), r.document_text) for r in retriever.search(q, 6)]
                for q in QUERIES.values()]
    index = DenseIndex.from_shards(run / EMBEDDINGS, IndexConfig(**RunRecord.load(run).index))
    return index.search(np.eye(index.index.d, dtype=np.float32)[:4], 6)[1]


def test_an_untampered_copy_loads_and_answers(tiny_run, copy):
    """The control: copying alone changes nothing, so a refusal below is the tampering's."""
    for how in ("serve", "index"):
        assert load(copy, how) == load(tiny_run, how)


@pytest.mark.parametrize("tamper", TAMPERS)
@pytest.mark.parametrize("name, how", FILES, ids=[name for name, _ in FILES])
def test_tampered_file_is_refused_naming_it(copy, name, how, tamper):
    target = copy / name
    assert target.is_file(), f"the tiny run has no {name}: update FILES"
    TAMPERS[tamper](target)
    with pytest.raises(ArtifactError, match=re.escape(str(target))):
        load(copy, how)


def test_without_verify_sizes_are_still_checked(tiny_run, copy):
    """verify=False skips the sha256 (a full read of a GB-sized file), never the size."""
    index_dir = copy / "corpus/index"
    flip(index_dir / "pids.npy", at=1.0)  # in the last passage id, past the header
    wrong = DenseIndex.load(index_dir, verify=False)  # not detected without the hash: the price of skipping it
    assert list(wrong.pids) != list(DenseIndex.load(tiny_run / "corpus/index").pids)
    with pytest.raises(ArtifactError, match="sha256"):
        DenseIndex.load(index_dir)
    truncate(index_dir / "index.faiss")
    with pytest.raises(ArtifactError, match=re.escape(str(index_dir / "index.faiss")) + ".*truncated"):
        DenseIndex.load(index_dir, verify=False)
    with pytest.raises(ArtifactError, match=re.escape(str(copy / EMBEDDINGS / "emb-00000.npy"))):
        truncate(copy / EMBEDDINGS / "emb-00000.npy")
        list(iter_shards(copy / EMBEDDINGS, verify=False))


@pytest.mark.parametrize("edit", ["value", "key"])
def test_an_edited_manifest_fails_its_own_checksum(copy, edit):
    """A change that keeps the JSON valid (a digit, a renamed key) is caught by the manifest's own checksum."""
    path = copy / "corpus/index/manifest.json"
    text = path.read_text()
    if edit == "value":
        body = json.loads(text)
        text = text.replace(f'"count": {body["config"]["count"]}', f'"count": {body["config"]["count"] + 1}')
        match = re.escape(str(path)) + ".*own checksum"
    else:
        text = text.replace(f'"{CHECKSUM}"', '"checksun"')  # as if it never had one: but it records files
        match = re.escape(str(path)) + ".*damaged"
    assert text != path.read_text()
    path.write_text(text)
    with pytest.raises(ArtifactError, match=match):
        load(copy, "serve")


def strip_records(run: Path) -> None:
    """Make the run look built before the checksums: no file records, no self-checksums, no shard records."""
    for manifest in run.rglob(MANIFEST):
        body = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({k: v for k, v in body.items() if k not in ("files", CHECKSUM)}))
    for export in run.rglob(EXPORT_FILE):
        body = json.loads(export.read_text())
        export.write_text(json.dumps({k: v for k, v in body.items() if k != "files"}))
    for shard_record in (run / EMBEDDINGS).glob("shard-*.json"):
        shard_record.unlink()
    record_path(run / "corpus/passages.sqlite").unlink()


def test_a_run_from_before_the_checksums_loads_and_answers_alike(tiny_run, copy):
    strip_records(copy)
    for how in ("serve", "index"):
        assert load(copy, how) == load(tiny_run, how)


@pytest.mark.parametrize("name, how", [
    ("corpus/index/index.faiss", "serve"), ("ce/onnx/fp32/model.onnx", "serve"),
    ("corpus/passages.sqlite", "serve"), ("corpus/bm25/data.csc.index.npy", "serve"),
    ("corpus/index/manifest.json", "serve"), (f"{EMBEDDINGS}/emb-00000.npy", "index")])
def test_a_truncated_file_of_a_run_from_before_the_checksums_is_refused_naming_it(copy, name, how):
    """Without records what can be checked still is: a truncated file fails to parse, refused with its path."""
    strip_records(copy)
    truncate(copy / name)
    with pytest.raises(ArtifactError, match=re.escape(str(copy / name))):
        load(copy, how)
