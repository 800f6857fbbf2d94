"""Atomic writes and run manifests, so a crash never leaves a half-written artifact and a
mismatched model/index pair is refused at load instead of silently giving bad results."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

MANIFEST = "manifest.json"
CHECKSUM = "checksum"  # a sealed JSON file's sha256 of its own content (all other keys)
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
    sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_scratch_prefix(path), suffix=".tmp", dir=path.parent)
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
    with scratch_dir(path) as tmp:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)


@contextlib.contextmanager
def scratch_dir(beside: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory next to `beside` (same filesystem, so it can be renamed into place), named
    after this process so that a later writer can tell a killed writer's leftovers from a live one's."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(beside)
    tmp = Path(tempfile.mkdtemp(prefix=_scratch_prefix(beside), suffix=".tmp", dir=beside.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _scratch_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def sweep_stale(path: str | os.PathLike) -> list[Path]:
    """Delete what writers of `path` that were killed (SIGKILL, power loss) left beside it: their
    temporary files and directories, and an old version kept for a swap. If the kill fell between the
    two renames of a swap, `path` is missing and the old version (the last complete one) is put back.
    Leftovers of processes still alive are never touched. Returns what it removed or restored."""
    path = Path(path)
    prefix = f".{path.name}."
    done = []
    for entry in path.parent.glob(glob.escape(prefix) + "*"):
        match = re.fullmatch(r"(\d+)\.[^.]+\.tmp|old-(\d+)", entry.name[len(prefix):])
        if not match or _alive(int(match.group(1) or match.group(2))):
            continue
        if match.group(2) and not path.exists():
            with contextlib.suppress(FileNotFoundError):  # another writer's sweep restored it first
                os.replace(entry, path)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        done.append(entry)
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


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


def write_manifest(run_dir: str | os.PathLike, kind: str, config: Any, inputs: dict[str, str],
                   files: Iterable[str] = ()) -> None:
    """Record what built `run_dir`; `inputs` maps input names to fingerprints checked at load, and `files`
    names the payload files in `run_dir` whose size and sha256 are recorded for `verify_files`."""
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / MANIFEST, seal({
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "inputs": inputs,
        "files": file_records(run_dir, files),
        "environment": environment(),
    }))


def read_manifest(run_dir: str | os.PathLike, kind: str, hint: str = "") -> dict[str, Any]:
    """Load a run's manifest, refusing a missing, half-built, damaged or foreign directory."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        state = "does not exist" if not run_dir.exists() else "is incomplete (no manifest.json)"
        raise ArtifactError(f"{run_dir} {state}." + (f" Build it with: {hint}" if hint else ""))
    manifest = read_json(manifest_path)
    if ("files" in manifest) != (CHECKSUM in manifest):  # both are written together: one byte renamed a key
        raise ArtifactError(f"{manifest_path} is damaged (it records files without its own checksum, or "
                            "the reverse); rebuild it")
    if manifest.get("kind") != kind:
        raise ArtifactError(f"{run_dir} holds a {manifest.get('kind')!r} artifact, expected {kind!r}.")
    return manifest


def _digest(obj: Any) -> str:
    canonical = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode("ascii")).hexdigest()


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` plus a checksum of its own content, so a changed byte in the JSON file is caught by `read_json`."""
    body = {k: v for k, v in to_jsonable(obj).items() if k != CHECKSUM}
    return {**body, CHECKSUM: _digest(body)}


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object file, refused with its path when it does not parse or fails its own checksum
    (files written before checksums have none and are taken as they are)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is damaged (truncated or altered: {e}); rebuild it") from e
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path} is damaged: expected a JSON object, found {type(obj).__name__}; rebuild it")
    if CHECKSUM in obj and _digest({k: v for k, v in obj.items() if k != CHECKSUM}) != obj[CHECKSUM]:
        raise ArtifactError(f"{path} does not match its own checksum (altered or damaged); rebuild it")
    return obj


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """Size and sha256 of a payload file, as `verify_files` checks them."""
    return {"bytes": os.path.getsize(path), "sha256": file_fingerprint(path)}


def file_records(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    return {name: file_record(Path(directory) / name) for name in sorted(names)}


def verify_files(directory: str | os.PathLike, records: dict[str, dict[str, Any]], verify: bool = True,
                 hint: str = "rebuild it") -> None:
    """Refuse a recorded payload file that is missing, resized or, with `verify`, changed, naming it.

    The size is one stat and always checked (it catches truncation). The sha256 reads the whole file, about
    1.4 GB/s on one core here: nothing for a tiny run, but some 10-30 s for a full MS MARCO index, store and
    BM25 index (tens of GB), which is why loaders take `verify`; a memory-mapped load then also starts warm."""
    directory = Path(directory)
    for name, record in records.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing (recorded when it was built); {hint}")
        size = path.stat().st_size
        if size != record.get("bytes"):
            raise ArtifactError(f"{path} is {size} bytes but was built with {record.get('bytes')}: truncated "
                                f"or overwritten; {hint}")
        if verify and file_fingerprint(path) != record.get("sha256"):
            raise ArtifactError(f"{path} does not match the sha256 recorded when it was built (altered or "
                                f"damaged); {hint}")


def check_inputs(run_dir: str | os.PathLike, manifest: dict[str, Any], expected: dict[str, str]) -> None:
    """Refuse a run whose recorded input fingerprints differ from the ones given now."""
    recorded = manifest.get("inputs", {})
    for name, fingerprint in expected.items():
        if name in recorded and recorded[name] != fingerprint:
            raise ArtifactError(
                f"{run_dir} was built from a different {name} "
                f"(recorded {recorded[name][:19]}..., now {fingerprint[:19]}...). Rebuild it."
            )
