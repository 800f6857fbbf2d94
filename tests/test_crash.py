"""Crash consistency: a writer SIGKILLed mid-write never leaves an artifact that loads half-written (the loader
refuses it, it is absent, or the previous complete one is still there, intact), and a rerun finishes with
what an uninterrupted run writes. Embedding shards and the HNSW index, the passage store, the BM25 index.

Each writer runs the real code in a child process; a child only waits longer at one point (each model forward,
or just before a manifest is written) so that the kill lands at a known place, or after a seeded random delay.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

from irbase.artifacts import ArtifactError
from irbase.bm25 import BM25Config, BM25Index
from tests.conftest import PASSAGES

from biencoder.encode import EncodeConfig, encode_collection, iter_shards
from biencoder.index import DenseIndex, IndexConfig
from pipeline.store import PassageStore

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
INPUTS = {"collection": "sha256:new", "model": "sha256:m"}
ENCODE = {"batch_size": 10, "shard_size": 30, "dtype": "float32", "bf16": False}
INDEX = {"kind": "hnsw", "m": 8, "ef_construction": 16, "ef_search": 16, "gpu": False}
OLD = [("x1", "an older collection"), ("x2", "that the rebuild replaces")]
CHILD = r'''
import json, sys, time
args = json.loads(open(sys.argv[1]).read())
passages = [tuple(p) for p in args["passages"]]

def delayed(fn, seconds):
    def wrapper(*a, **k):
        time.sleep(seconds)
        return fn(*a, **k)
    return wrapper

if args["job"] == "dense":
    import torch
    torch.set_num_threads(1)
    import biencoder.index as index_module
    from biencoder.encode import EncodeConfig, encode_collection
    from biencoder.model import BiEncoder
    BiEncoder.encode = delayed(BiEncoder.encode, args["pause"])
    index_module.write_manifest = delayed(index_module.write_manifest, 60)
    model = BiEncoder.load(args["model"]).eval()
    print("ready", flush=True)
    encode_collection(model, passages, args["shards"], EncodeConfig(**args["encode"]), args["inputs"])
    index = index_module.DenseIndex.from_shards(args["shards"], index_module.IndexConfig(**args["index"]))
    index.save(args["out"], args["inputs"])
elif args["job"] == "store":
    from pipeline.store import PassageStore
    def slow():
        for p in passages:
            time.sleep(args["pause"])
            yield p
    print("ready", flush=True)
    PassageStore.build(args["out"], slow(), args["inputs"]["collection"], batch=50)
else:
    import irbase.bm25 as bm25
    bm25.write_manifest = delayed(bm25.write_manifest, args["pause"])
    print("ready", flush=True)
    bm25.BM25Index.build(passages, bm25.BM25Config()).save(args["out"], args["inputs"])
print("done", flush=True)
'''


def synthetic(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Passages of words the tiny tokenizers know."""
    rng = random.Random(seed)
    words = sorted({w for text in PASSAGES.values() for w in text.replace(",", " ").replace(".", " ").split()})
    return [(f"d{i}", " ".join(rng.choices(words, k=rng.randint(3, 16)))) for i in range(n)]


@contextlib.contextmanager
def child(tmp_path: Path, job: str, passages, **args) -> Iterator[subprocess.Popen]:
    """A writer in a child process, started once it has imported what it needs (it printed "ready")."""
    spec = tmp_path / f"{job}-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps({"job": job, "passages": passages, "inputs": INPUTS, **args}))
    with open(spec.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(spec)], cwd=REPO, env=ENV,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", spec.with_suffix(".err").read_text()[-3000:]
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
        proc.stdout.close()


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 60.0) -> None:
    """SIGKILL the writer as soon as `ready()` holds; it must still have been writing then."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the writer finished or failed before the kill point"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL


def in_temp(parent: Path, name: str, inside: str) -> Callable[[], bool]:
    """Whether an atomic write of `name` has reached `inside` (a file in its temporary directory)."""
    return lambda: any(parent.glob(f".{name}.*.tmp/{inside}"))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Encode as the child does (one thread), so the rerun's shards can be compared byte for byte."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bi_model(tmp_path_factory, tiny_encoder) -> Path:
    from biencoder.model import BiEncoder, BiEncoderConfig
    from irbase.lm import BaseLMConfig

    path = tmp_path_factory.mktemp("bi") / "model"
    BiEncoder.from_base(BiEncoderConfig(base_lm=BaseLMConfig(name=str(tiny_encoder)))).save(path)
    return path


def encode_and_index(model, passages, shards: Path, out: Path) -> DenseIndex:
    with one_thread():
        encode_collection(model, passages, shards, EncodeConfig(**ENCODE), INPUTS)
    DenseIndex.from_shards(shards, IndexConfig(**INDEX)).save(out, INPUTS)
    return DenseIndex.load(out, INPUTS)


def assert_same_ranking(got: DenseIndex, want: DenseIndex, queries: np.ndarray) -> None:
    """Exhaustive rankings (k = the corpus) agree: ids exactly, scores within 1e-6."""
    (got_scores, got_ids), (want_scores, want_ids) = (i.search(queries, len(want.pids)) for i in (got, want))
    assert got_ids == want_ids
    np.testing.assert_allclose(np.concatenate(got_scores), np.concatenate(want_scores), atol=1e-6)


def test_encode_and_index_killed_midway_resume_to_the_uninterrupted_result(tmp_path, bi_model):
    from biencoder.model import BiEncoder

    passages = synthetic(240)
    model = BiEncoder.load(bi_model).eval()
    reference = encode_and_index(model, passages, tmp_path / "ref-emb", tmp_path / "ref-index")
    shards, out = tmp_path / "emb", tmp_path / "index"
    job = dict(model=str(bi_model), shards=str(shards), out=str(out), encode=ENCODE, index=INDEX, pause=0.05)
    # killed once shard 0 is finished, while shard 1 is being written
    with child(tmp_path, "dense", passages, **job) as proc:
        kill_when(proc, lambda: (shards / "shard-00000.json").is_file())
    with pytest.raises(ArtifactError, match="of 8 shards missing"):
        list(iter_shards(shards))
    with pytest.raises(ArtifactError, match="does not exist"):
        DenseIndex.load(out)
    # an older complete index is in place; the resumed run is killed inside the new index's atomic write
    old = DenseIndex.from_embeddings(np.eye(model.dim, dtype=np.float32)[:2], [p for p, _ in OLD],
                                     IndexConfig(kind="flat", gpu=False))
    old.save(out, {"model": "sha256:old"})
    old_bytes = {p.name: p.read_bytes() for p in out.iterdir()}
    with child(tmp_path, "dense", passages, **job) as proc:
        kill_when(proc, in_temp(tmp_path, "index", "pids.npy"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old_bytes
    assert list(DenseIndex.load(out, {"model": "sha256:old"}).pids) == [p for p, _ in OLD]
    for name in ("emb", "ids", "shard"):  # the resumed shards are the uninterrupted run's, byte for byte
        assert [f.read_bytes() for f in sorted(shards.glob(f"{name}-*"))] == \
            [f.read_bytes() for f in sorted((tmp_path / "ref-emb").glob(f"{name}-*"))]
    # the rerun finishes: nothing is left to encode, and the index ranks as the uninterrupted one
    resumed = encode_and_index(model, passages, shards, out)
    queries = np.concatenate([v for _, v in iter_shards(tmp_path / "ref-emb")])[:8]
    assert_same_ranking(resumed, reference, queries)


def assert_store(path: Path, passages, collection: str) -> None:
    store = PassageStore(path)
    assert (store.collection, len(store)) == (collection, len(passages))
    assert store.get_many([p for p, _ in passages]) == dict(passages)


@pytest.mark.parametrize("kill_at", ["mid-insert", "random"])
def test_passage_store_killed_midway_keeps_the_old_store_and_rebuilds_alike(tmp_path, kill_at):
    passages = synthetic(1200)
    PassageStore.build(tmp_path / "ref.sqlite", passages, INPUTS["collection"])
    path = tmp_path / "passages.sqlite"
    PassageStore.build(path, OLD, "sha256:old")
    with child(tmp_path, "store", passages, out=str(path), pause=0.002) as proc:
        if kill_at == "mid-insert":  # pages of the new store are on disk under its temporary name
            kill_when(proc, lambda: any(p.stat().st_size >= 8192 for p in tmp_path.glob(".passages.sqlite.*.tmp")))
        else:
            time.sleep(random.Random(0).uniform(0.1, 2.0))
            kill_when(proc, lambda: True)
    try:
        assert_store(path, OLD, "sha256:old")  # the old store, whole and verified
    except ArtifactError:
        # only a kill between the new record and the rename: refused, never served
        assert kill_at == "random"
    PassageStore.build(path, passages, INPUTS["collection"])
    assert_store(path, passages, INPUTS["collection"])
    assert path.read_bytes() == (tmp_path / "ref.sqlite").read_bytes()


def bm25_results(index: BM25Index, queries: list[str]) -> list[list[tuple[str, float]]]:
    return index.search_ids(queries, 20)


@pytest.mark.parametrize("kill_at", ["mid-save", "random"])
def test_bm25_index_killed_midway_keeps_the_old_index_and_rebuilds_alike(tmp_path, kill_at):
    passages = synthetic(1500)
    queries = [text for _, text in synthetic(10, seed=1)]
    BM25Index.build(passages, BM25Config()).save(tmp_path / "ref", INPUTS)
    reference = bm25_results(BM25Index.load(tmp_path / "ref"), queries)
    out = tmp_path / "bm25"
    BM25Index.build(OLD, BM25Config()).save(out, {"collection": "sha256:old"})
    old_bytes = {p.name: p.read_bytes() for p in out.iterdir()}
    with child(tmp_path, "bm25", passages, out=str(out), pause=3.0) as proc:
        if kill_at == "mid-save":  # the arrays, texts and ids are written, the manifest is not yet
            kill_when(proc, in_temp(tmp_path, "bm25", "pids.npy"))
        else:
            time.sleep(random.Random(0).uniform(0.05, 2.0))
            kill_when(proc, lambda: True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old_bytes
    assert list(BM25Index.load(out, {"collection": "sha256:old"}).pids) == [p for p, _ in OLD]
    BM25Index.build(passages, BM25Config()).save(out, INPUTS)
    rebuilt = bm25_results(BM25Index.load(out, INPUTS), queries)
    assert [[p for p, _ in r] for r in rebuilt] == [[p for p, _ in r] for r in reference]
    np.testing.assert_allclose([s for r in rebuilt for _, s in r], [s for r in reference for _, s in r], atol=1e-6)
