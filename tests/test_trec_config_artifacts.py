import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from irbase.artifacts import (ArtifactError, atomic_dir, atomic_path, atomic_write_json, atomic_write_text,
                              check_inputs, read_manifest, write_manifest)
from irbase.config import ConfigError, load_section, load_yaml, parse_config_args
from irbase.formats import DataFormatError
from irbase.trec import read_trec_run, write_trec_run


def test_trec_run_format_and_roundtrip(tmp_path):
    run = {"q1": [("p3", 2.5), ("p1", 1.25)], "q2": [("p9", -0.5)]}
    path = tmp_path / "run.trec"
    write_trec_run(path, run, tag="bm25")
    assert path.read_text().splitlines() == [
        "q1 Q0 p3 1 2.500000 bm25", "q1 Q0 p1 2 1.250000 bm25", "q2 Q0 p9 1 -0.500000 bm25"]
    assert read_trec_run(path) == run
    with pytest.raises(ValueError, match="tag"):
        write_trec_run(path, run, tag="two words")


def test_trec_run_malformed_line(tmp_path):
    path = tmp_path / "bad.trec"
    path.write_text("q1 Q0 p1 1 2.0 tag\nq1 Q0 p2 two 1.0 tag\n")
    with pytest.raises(DataFormatError, match=r"bad\.trec:2: rank 'two'"):
        read_trec_run(path)


@dataclass
class Inner:
    depth: int = 10
    name: str = "x"


@dataclass
class Outer:
    lr: float = 1e-4
    layers: list[int] = field(default_factory=lambda: [1, 2])
    inner: Inner = field(default_factory=Inner)
    note: str | None = None


def test_config_yaml_overrides_and_nesting(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  lr: 3\n  inner:\n    depth: 5\n")
    cfg = load_section(path, "model", Outer, ["model.inner.name=abc", "model.layers=[4, 8]", "model.note=hi"])
    assert cfg == Outer(lr=3.0, layers=[4, 8], inner=Inner(depth=5, name="abc"), note="hi")
    assert load_section(path, "missing", Outer) == Outer()
    # YAML 1.1 reads 3e-4 (no dot) as a string: a float field still takes it as the number
    assert load_section(path, "model", Outer, ["model.lr=3e-4"]).lr == 3e-4


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  lrr: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:model: unknown key\(s\) lrr"):
        load_section(path, "model", Outer)
    path.write_text("model:\n  inner:\n    depth: deep\n")
    with pytest.raises(ConfigError, match=r"model\.inner\.depth: expected int"):
        load_section(path, "model", Outer)
    with pytest.raises(ConfigError, match=r"model\.lr: expected float, got 'fast'"):
        load_section(path, "model", Outer, ["model.inner.depth=1", "model.lr=fast"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_yaml(path, ["model.lr"])
    with pytest.raises(ConfigError, match=r"override 'model.note=\{run_dir\}/x': the value is not valid YAML"):
        load_yaml(path, ["model.note={run_dir}/x"])
    assert load_yaml(path, ['model.note="{run_dir}/x"'])["model"]["note"] == "{run_dir}/x"
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    """Each writer fails for real part way through; what was there before survives byte for byte, and no
    temporary is left in the folder."""
    path = tmp_path / "a.json"
    old = b'{"old": [1, 2, 3]}\n\xc3\xa9 not rewritten\n'
    path.write_bytes(old)
    before_mode = os.stat(path).st_mode
    with pytest.raises(RuntimeError, match="crash mid-write"):
        with atomic_path(path) as tmp:
            assert tmp.parent == tmp_path  # beside the target: the rename stays on one file system
            with open(tmp, "wb") as f:
                f.write(b'{"new": ')  # half of the new content is on disk when the block fails
                f.flush()
                os.fsync(f.fileno())
            assert path.read_bytes() == old  # nothing replaced before the block ends
            raise RuntimeError("crash mid-write")
    assert path.read_bytes() == old and os.stat(path).st_mode == before_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]

    # an object json cannot serialise: the write fails before anything replaces the old file
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(path, {"fine": 1, "bad": object()})
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]

    # a directory: the old one survives whole, and neither the temporary nor a half-swapped `.old` remains
    target = tmp_path / "d"
    target.mkdir()
    (target / "keep.bin").write_bytes(b"\x00\x01old")
    (target / "sub").mkdir()
    (target / "sub" / "x.txt").write_text("nested", encoding="utf-8")
    with pytest.raises(RuntimeError, match="crash mid-build"):
        with atomic_dir(target) as tmp:
            assert tmp.parent == tmp_path
            (tmp / "keep.bin").write_bytes(b"new")
            (tmp / "partial").write_text("x")
            raise RuntimeError("crash mid-build")
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["keep.bin", "sub", "sub/x.txt"]
    assert (target / "keep.bin").read_bytes() == b"\x00\x01old"
    assert (target / "sub" / "x.txt").read_bytes() == b"nested"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d"]

    # and a write that succeeds replaces the file, with the permissions of a normally created file
    atomic_write_json(path, {"new": True})
    assert json.loads(path.read_text()) == {"new": True}
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_dir_replaces_whole(tmp_path):
    target = tmp_path / "run"
    with atomic_dir(target) as tmp:
        (tmp / "v1").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "v2").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["v2"]


_KILLED_WRITER = """
import os, signal, sys
from irbase.artifacts import atomic_dir, atomic_path
root = sys.argv[1]
with atomic_dir(root + "/d") as tmp, atomic_path(root + "/f.bin") as ftmp:
    (tmp / "half.bin").write_bytes(b"x" * 4096)
    ftmp.write_bytes(b"half")
    print(os.getpid(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writers_leftovers_are_swept_by_the_next_write_and_live_ones_kept(tmp_path):
    """SIGKILL inside atomic_dir and atomic_path leaves their temporaries (no finally runs); the next
    writer of the same path removes them, keeps a live process's, and puts back a complete old version
    when the kill fell between the two renames of a swap."""
    import signal
    import subprocess
    import sys

    from irbase.artifacts import scratch_dir, sweep_stale

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "v1").write_text("1")
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    dead = int(proc.stdout)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert len(left) == 2 and all(name.startswith((f".d.{dead}.", f".f.bin.{dead}.")) for name in left)
    live = tmp_path / f".d.{os.getpid()}.abcd1234.tmp"  # a writer in this (live) process
    live.mkdir()
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "v2").write_text("2")
    atomic_write_text(tmp_path / "f.bin", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "d", "f.bin"])
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["v2"] and (tmp_path / "f.bin").read_text() == "whole"

    # killed between "move the old version aside" and "move the new one in": the old one comes back
    os.replace(tmp_path / "d", tmp_path / f".d.old-{dead}")
    assert sweep_stale(tmp_path / "d") == [tmp_path / f".d.old-{dead}"]
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["v2"]
    with scratch_dir(tmp_path / "d") as scratch:  # named after this process, gone when the block ends
        assert scratch.name.startswith(f".d.{os.getpid()}.") and scratch.is_dir()
    assert not scratch.exists() and live.is_dir()


def test_manifest_refuses_missing_foreign_and_mismatched(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist. Build it with: make it"):
        read_manifest(tmp_path / "run", "bm25", hint="make it")
    (tmp_path / "half").mkdir()
    with pytest.raises(ArtifactError, match="incomplete"):
        read_manifest(tmp_path / "half", "bm25")
    write_manifest(tmp_path / "half", "faiss", {"m": 16}, {"collection": "sha256:aaa"})
    with pytest.raises(ArtifactError, match="holds a 'faiss' artifact, expected 'bm25'"):
        read_manifest(tmp_path / "half", "bm25")
    manifest = read_manifest(tmp_path / "half", "faiss")
    assert manifest["config"] == {"m": 16} and "torch" in manifest["environment"]["packages"]
    check_inputs(tmp_path / "half", manifest, {"collection": "sha256:aaa"})
    with pytest.raises(ArtifactError, match="different collection"):
        check_inputs(tmp_path / "half", manifest, {"collection": "sha256:bbb"})
    json.loads((tmp_path / "half" / "manifest.json").read_text())



def test_overrides_after_a_many_valued_option_are_not_swallowed(monkeypatch):
    """`--upto benchmark bm25.expansion=null` once stopped with "unknown stage 'bm25.expansion=null'"."""
    import argparse
    import pipeline.build as build
    from irbase.config import add_config_args
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1])
    add_config_args(parser)
    args = parse_config_args(parser, ["bm25.k1=1.2", "--concurrency", "1", "16",
                                      'biencoder.negatives.files=["a=b.tsv"]'])
    assert args.concurrency == [1, 16] and args.overrides == ["bm25.k1=1.2", 'biencoder.negatives.files=["a=b.tsv"]']

    seen = {}
    monkeypatch.setattr(build.Builder, "run_all", lambda self, only, force: seen.update(
        only=only, force=force, overrides=self.overrides) or [])
    monkeypatch.setattr(build, "print_summary", lambda *a: None)
    assert build.main(["--config", "configs/mini.yaml", "--upto", "biencoder-r2", "bm25.expansion=null",
                       "--force", "mine", "bm25.k1=1.2"]) == 0
    assert seen == {"only": ["base-lm", "bm25-negatives", "biencoder", "mine", "biencoder-r2"], "force": ["mine"],
                    "overrides": ["bm25.expansion=null", "bm25.k1=1.2"]}
