"""Crash consistency: a writer SIGKILLed mid-write never leaves an artifact that loads half-written (the loader
refuses it, it is absent, or the previous complete one is still there, intact), and a rerun finishes with
what an uninterrupted run writes. Embedding shards and the HNSW index, the passage store, the BM25 index;
and, marked slow (run them with `pytest -m slow`), the ONNX export and the query generator's shards.

Each writer runs the real code in a child process; a child only waits longer at one point (each model forward,
or just before a manifest is written) so that the kill lands at a known place, or after a seeded random delay.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

from irbase.artifacts import ArtifactError, read_json
from irbase.bm25 import BM25Config, BM25Index
from tests.conftest import PASSAGES, QUERIES, write_train_dev, write_tsv

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
    with _spawn(tmp_path, job, CHILD, ENV, {"job": job, "passages": passages, "inputs": INPUTS, **args}) as proc:
        yield proc


@contextlib.contextmanager
def _spawn(tmp_path: Path, name: str, script: str, env: dict, spec: dict) -> Iterator[subprocess.Popen]:
    """`script` in a child process reading `spec` (JSON), yielded once it printed "ready"; killed on exit."""
    path = tmp_path / f"{name}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    with open(path.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", path.with_suffix(".err").read_text()[-3000:]
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


# The CLI stages below run as `python -m MODULE --config CONFIG` (runpy, so the exported graph names its
# module `__main__` as the real command does); the child only waits at one atomic write, named by `pause`.
# One hash seed for every process: Gemma 3's forward loops over a set of layer types (transformers
# modeling_gemma3.py), so the exported graph's node order, and model.onnx's sha256, follow the hash seed.
CLI_ENV = {**ENV, "PYTHONHASHSEED": "0"}
CLI_CHILD = r'''
import json, runpy, sys, time
from pathlib import Path
import irbase.artifacts as artifacts
args = json.loads(open(sys.argv[1]).read())

def paused(fn, when):
    def wrapper(path, *a, **k):
        if when(Path(path)):
            print("pausing before", Path(path).parent.name, Path(path).name, flush=True)
            time.sleep(args["seconds"])
        return fn(path, *a, **k)
    return wrapper

if args["pause"] == "int8-export.json":  # the int8 variant is staged whole but for its export.json
    artifacts.atomic_write_json = paused(artifacts.atomic_write_json,
                                         lambda p: p.name == "export.json" and p.parent.name.startswith(".int8."))
elif args["pause"] == "shard":  # each generated shard, before it is written
    artifacts.atomic_write_text = paused(artifacts.atomic_write_text, lambda p: p.parent.name == "shards")
print("ready", flush=True)
sys.argv = [args["module"], "--config", args["config"]]
runpy.run_module(args["module"], run_name="__main__", alter_sys=True)
'''


@contextlib.contextmanager
def cli_child(tmp_path: Path, module: str, config: Path, pause: str, seconds: float) -> Iterator[subprocess.Popen]:
    """`python -m module --config config` in a child process that waits `seconds` at `pause`."""
    spec = {"module": module, "config": str(config), "pause": pause, "seconds": seconds}
    with _spawn(tmp_path, module, CLI_CHILD, CLI_ENV, spec) as proc:
        yield proc


def run_cli(module: str, config: Path) -> str:
    """The stage run to its end, uninterrupted, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", module, "--config", str(config)], cwd=REPO, env=CLI_ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def export_record(variant_dir: Path) -> dict:
    """A variant's export.json but for what depends on when and where it ran."""
    record = read_json(variant_dir / "export.json")
    return {k: v for k, v in record.items() if k not in ("export_seconds", "environment")}


@pytest.mark.slow
def test_onnx_export_killed_midway_leaves_no_half_variant_and_reexports_alike(tmp_path, tiny_decoder):
    import torch

    from crossencoder.model import CrossEncoder, CrossEncoderConfig
    from crossencoder.runtime import OnnxReranker
    from irbase.lm import BaseLMConfig

    groups = [(q, list(PASSAGES.values())) for q in QUERIES.values()]
    write_train_dev(tmp_path / "data", tmp_path / "mined.tsv")
    model = CrossEncoder.from_base(CrossEncoderConfig(base_lm=BaseLMConfig(name=str(tiny_decoder), bidirectional=True)))
    torch.manual_seed(1)
    torch.nn.init.normal_(model.head.weight, std=1.0)  # spread the untrained scores so rankings mean something
    model.save(tmp_path / "run" / "crossencoder" / "model")
    config = tmp_path / "config.yaml"
    config.write_text(f"run: {{dir: {tmp_path / 'run'}, seed: 7}}\ndata: {{root: {tmp_path / 'data'}}}\n"
                      "export: {variants: [fp32, int8]}\n")
    onnx = tmp_path / "run" / "crossencoder" / "onnx"
    # the uninterrupted export, moved aside so the killed one starts from nothing in the same run directory
    run_cli("crossencoder.export", config)
    reference = tmp_path / "reference"
    onnx.rename(reference)
    want = {v: [OnnxReranker(reference / v, threads=1, verify=True).score(q, ps) for q, ps in groups]
            for v in ("fp32", "int8")}

    # killed once fp32 is swapped in and int8 is staged (model, tokenizer, pair format) but for its export.json
    with cli_child(tmp_path, "crossencoder.export", config, "int8-export.json", 600) as proc:
        kill_when(proc, lambda: proc.stdout.readline().startswith("pausing before .int8."), timeout=600)
    assert sorted(p.name for p in onnx.iterdir() if not p.name.startswith(".")) == ["fp32"]
    fp32 = OnnxReranker(onnx / "fp32", threads=1, verify=True)  # complete: every recorded sha256 checks
    np.testing.assert_allclose(np.concatenate([fp32.score(q, ps) for q, ps in groups]),
                               np.concatenate(want["fp32"]), atol=1e-6)
    assert export_record(onnx / "fp32") == export_record(reference / "fp32")
    staged = [p for p in onnx.iterdir() if p.name.startswith(".")]
    assert [p.name.split(".")[1] for p in staged] == ["int8"] and (staged[0] / "model.onnx").is_file()
    with pytest.raises(FileNotFoundError, match="no export.json: an interrupted or unchecked export"):
        OnnxReranker(staged[0], threads=1)  # the half-written variant under its temporary name is refused
    assert not (onnx / "int8").exists()

    # the rerun exports both again: byte-identical files, the same records, the same scores
    run_cli("crossencoder.export", config)
    for variant in ("fp32", "int8"):
        got = OnnxReranker(onnx / variant, threads=1, verify=True)
        np.testing.assert_allclose(np.concatenate([got.score(q, ps) for q, ps in groups]),
                                   np.concatenate(want[variant]), atol=1e-6)
        assert export_record(onnx / variant) == export_record(reference / variant), variant
    # the killed export's staged variant and its scratch (the fp32 graph) are swept by the rerun
    assert [p.name for p in (*onnx.parent.glob(".*"), *onnx.glob(".*"))] == []


@pytest.mark.slow
def test_query_generation_killed_after_a_shard_resumes_to_the_uninterrupted_files(tmp_path, tiny_decoder):
    from irbase.lm import BaseLMConfig, load_tokenizer
    from querygen.data import PromptEncoder, vocab_ids
    from querygen.model import GeneratorConfig, QueryGenerator

    data = tmp_path / "data"
    write_train_dev(data, tmp_path / "mined.tsv")
    passages = list(PASSAGES.items()) + synthetic(18)
    write_tsv(data / "collection.tsv", passages)
    shard_size, total = 3, 8  # 24 passages
    generator = GeneratorConfig(base_lm=BaseLMConfig(name=str(tiny_decoder)), train_layers=1,
                                passage_max_tokens=16, query_max_tokens=6)
    tokenizer = load_tokenizer(str(tiny_decoder))
    encoder = PromptEncoder(tokenizer, generator.prompt, generator.passage_max_tokens, generator.query_max_tokens)
    vocab = vocab_ids(tokenizer, [t for _, t in passages] + list(QUERIES.values()), encoder)
    QueryGenerator.from_base(generator, vocab).save(tmp_path / "model")
    configs = {}
    for name in ("reference", "killed"):
        shutil.copytree(tmp_path / "model", tmp_path / name / "querygen" / "model")
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(f"""
run: {{dir: {tmp_path / name}, seed: 7}}
data: {{root: {data}}}
querygen:
  generate: {{sampling: {{per_passage: 2, top_k: 20, max_new_tokens: 6}}, batch_size: 2, shard_size: {shard_size},
             int8: true, threads: 1}}
""")
    run_cli("querygen.generate", configs["reference"])
    reference = tmp_path / "reference" / "querygen" / "generated"
    assert len(list((reference / "shards").glob("shard-*.tsv"))) == total
    assert (reference / "queries.generated.tsv").stat().st_size > 0

    out = tmp_path / "killed" / "querygen" / "generated"
    written = lambda: sorted((out / "shards").glob("shard-*.tsv"))  # noqa: E731
    at = random.Random(0).randint(1, total - 2)  # killed once `at` shards are written, before the next one is
    with cli_child(tmp_path, "querygen.generate", configs["killed"], "shard", 1.0) as proc:
        kill_when(proc, lambda: len(written()) >= at, timeout=600)
    finished = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in written()}
    assert at <= len(finished) < total and not (out / "queries.generated.tsv").exists()
    assert not (out / "qrels.generated.tsv").exists()
    for name, (_, text) in finished.items():  # whole shards, as the uninterrupted run wrote them
        assert text == (reference / "shards" / name).read_bytes(), name

    run_cli("querygen.generate", configs["killed"])
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in written() if p.name in finished} == finished
    assert [p.read_bytes() for p in written()] == [(reference / "shards" / p.name).read_bytes() for p in written()]
    assert len(written()) == total
    for name in ("queries.generated.tsv", "qrels.generated.tsv"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
