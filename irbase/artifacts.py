"""Atomic writes and run manifests, so a crash never leaves a half-written artifact and a
mismatched model/index pair is refused at load instead of silently giving bad results."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
_TRACKED_PACKAGES = (
    "torch", "transformers", "deepspeed", "numpy", "bm25s", "PyStemmer",
    "faiss-cpu", "faiss-gpu-cu12", "onnxruntime", "onnxruntime-gpu",
)


class ArtifactError(RuntimeError):
    """A run directory is missing, half-built, or was built from other inputs."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it in whole when the block succeeds.

    An existing directory at `path` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def to_jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    return obj


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Content hash of a data file: a run built from other data must not load silently."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """A saved model's identity for the artifacts built from it: a hash of its weights and configs."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.rglob("*") if p.suffix in {".safetensors", ".pt", ".json", ".npy"})
    return "sha256:" + hashlib.sha256("".join(file_fingerprint(p) for p in files).encode()).hexdigest()


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded beside every run and benchmark."""
    packages = {}
    for name in _TRACKED_PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "packages": packages,
    }


def write_manifest(run_dir: str | os.PathLike, kind: str, config: Any, inputs: dict[str, str]) -> None:
    """Record what built `run_dir`; `inputs` maps input names to fingerprints checked at load."""
    atomic_write_json(Path(run_dir) / MANIFEST, {
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "inputs": inputs,
        "environment": environment(),
    })


def read_manifest(run_dir: str | os.PathLike, kind: str, hint: str = "") -> dict[str, Any]:
    """Load a run's manifest, refusing a missing, half-built or foreign directory."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        state = "does not exist" if not run_dir.exists() else "is incomplete (no manifest.json)"
        raise ArtifactError(f"{run_dir} {state}." + (f" Build it with: {hint}" if hint else ""))
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{run_dir} holds a {manifest.get('kind')!r} artifact, expected {kind!r}.")
    return manifest


def check_inputs(run_dir: str | os.PathLike, manifest: dict[str, Any], expected: dict[str, str]) -> None:
    """Refuse a run whose recorded input fingerprints differ from the ones given now."""
    recorded = manifest.get("inputs", {})
    for name, fingerprint in expected.items():
        if name in recorded and recorded[name] != fingerprint:
            raise ArtifactError(
                f"{run_dir} was built from a different {name} "
                f"(recorded {recorded[name][:19]}..., now {fingerprint[:19]}...). Rebuild it."
            )
