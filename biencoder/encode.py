"""Encode a collection into memory-mapped `.npy` shards that resume after an interruption.

    python -m biencoder.encode --config configs/mini.yaml [--model DIR] [--out DIR]

Passages are sorted by length so each batch pads little; shard i holds sorted positions
[i*S, (i+1)*S) with their ids beside it. A shard is written under a temporary name and renamed when
complete, so a restart skips finished shards and redoes at most one. Each finished shard gets a sealed
`shard-NNNNN.json` last, recording its two files' sizes and sha256, which `iter_shards` checks. Under the
`deepspeed` launcher each process encodes shards i with i % world_size == rank.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from irbase.artifacts import (ArtifactError, atomic_path, atomic_write_json, file_fingerprint, file_records,
                              model_fingerprint, read_json, read_manifest, seal, verify_files, write_manifest)
from irbase.config import add_config_args, load_section
from irbase.dataset import Dataset, add_dataset_args, dataset_from_args
from irbase.lm import bf16_fast
from irbase.runconfig import DataConfig, stage_dir

from biencoder.model import BiEncoder

log = logging.getLogger(__name__)
KIND = "embeddings"
HINT = "python -m biencoder.encode --config configs/mini.yaml"


@dataclass
class EncodeConfig:
    batch_size: int = 64
    shard_size: int = 4096
    dtype: str = "float16"     # float16 halves disk and memory; float32 for exactness
    bf16: bool = True          # bf16 autocast for the forward pass (cosine 0.99999 to fp32 here)
    dim: int | None = None     # a Matryoshka prefix; None: full size
    threads: int | None = None


def encode_collection(model: BiEncoder, passages: Sequence[tuple[str, str]], out_dir: str | Path,
                      config: EncodeConfig, inputs: dict[str, str], rank: int = 0,
                      world_size: int = 1, replace_stale: bool = False,
                      barrier: Callable[[], None] = lambda: None) -> Path:
    """Write (or finish) the shards of `passages`; `inputs` fingerprints are checked on resume.

    Shards of another model or collection are refused, or with `replace_stale` deleted and redone. With
    several ranks, `barrier` (all ranks meet) keeps the others away until rank 0 has cleared stale shards and
    written the manifest, and returns only when every rank's shards are written.
    """
    out_dir = Path(out_dir)
    # bf16 as actually used: it falls back to fp32 where the device lacks native bf16
    bf16 = config.bf16 and bf16_fast(next(model.parameters()).device)
    settings = {"shard_size": config.shard_size, "dtype": config.dtype, "dim": config.dim,
                "count": len(passages), "bf16": bf16}
    if (out_dir / "manifest.json").is_file():
        manifest = read_manifest(out_dir, KIND)
        if manifest["inputs"] != inputs or manifest["config"] != settings:
            if not replace_stale:
                raise ArtifactError(f"{out_dir} holds embeddings of another model, collection or setting; "
                                    "remove it or choose another --out")
            log.info("%s: embeddings are stale (model, collection or settings changed): re-encoding", out_dir)
            if rank == 0:
                shutil.rmtree(out_dir)
    if not (out_dir / "manifest.json").is_file() and rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(out_dir, KIND, settings, inputs)
    barrier()
    order = sorted(range(len(passages)), key=lambda i: len(passages[i][1]))
    n_shards = (len(order) + config.shard_size - 1) // config.shard_size
    mine = [s for s in range(n_shards) if s % world_size == rank]
    recorded = "files" in read_manifest(out_dir, KIND)
    todo = [s for s in mine if not _finished(out_dir, s, recorded)]
    done = sum(min(config.shard_size, len(order) - s * config.shard_size) for s in mine if s not in todo)
    bar = tqdm(total=sum(min(config.shard_size, len(order) - s * config.shard_size) for s in mine),
               initial=done, desc="encoding passages", unit="passage", disable=rank != 0)
    start, encoded = time.perf_counter(), 0

    def progress(n: int) -> None:
        nonlocal encoded
        encoded += n
        bar.update(n)
        bar.set_postfix(passages_per_s=f"{encoded / (time.perf_counter() - start):.1f}")

    for shard in todo:
        rows = order[shard * config.shard_size:(shard + 1) * config.shard_size]
        _write_shard(model, passages, rows, out_dir, shard, config, bf16, progress)
    bar.close()
    barrier()
    if encoded and rank == 0:
        atomic_write_json(out_dir / "speed.json", {"passages": encoded,
                                                   "seconds": time.perf_counter() - start,
                                                   "passages_per_s": encoded / (time.perf_counter() - start)})
    return out_dir


def _write_shard(model: BiEncoder, passages: Sequence[tuple[str, str]], rows: Sequence[int], out_dir: Path,
                 shard: int, config: EncodeConfig, bf16: bool, progress: Callable[[int], None]) -> None:
    """Encode `rows` of `passages` into shard `shard`: embeddings and ids each renamed into place when
    complete, then the record of both that marks the shard finished."""
    emb, ids, record = _shard_files(shard)
    (out_dir / record).unlink(missing_ok=True)  # a redone shard is unfinished until its new record exists
    with atomic_path(out_dir / emb) as tmp:
        matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=config.dtype,
                                           shape=(len(rows), config.dim or model.dim))
        for b in range(0, len(rows), config.batch_size):
            chunk = rows[b:b + config.batch_size]
            matrix[b:b + len(chunk)] = model.encode([passages[i][1] for i in chunk], "passage",
                                                    batch_size=len(chunk), dim=config.dim, bf16=bf16)
            progress(len(chunk))
        matrix.flush()
        del matrix
        with atomic_path(out_dir / ids) as ids_tmp, open(ids_tmp, "wb") as f:
            np.save(f, np.asarray([passages[i][0] for i in rows]))
    atomic_write_json(out_dir / record, seal({"files": file_records(out_dir, (emb, ids))}))


def _shard_files(shard: int) -> tuple[str, str, str]:
    """A shard's embeddings, its passage ids, and the record of both written when it is finished."""
    return f"emb-{shard:05d}.npy", f"ids-{shard:05d}.npy", f"shard-{shard:05d}.json"


def _finished(out_dir: Path, shard: int, recorded: bool) -> bool:
    """Whether a shard was completely written. `recorded`: its manifest comes from a writer that records
    each finished shard (older ones did not; their shards count once the embeddings file exists)."""
    emb, ids, record = _shard_files(shard)
    return (out_dir / emb).is_file() and (out_dir / ids).is_file() and (not recorded or (out_dir / record).is_file())


def _load_shard(out_dir: Path, shard: int, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    emb, ids, record = _shard_files(shard)
    redo = f"delete {out_dir / emb} and {out_dir / record} and run {HINT} again to redo it"
    if (out_dir / record).is_file():
        verify_files(out_dir, read_json(out_dir / record).get("files", {}), verify, hint=redo)
    loaded = []
    for name, mmap in ((ids, None), (emb, "r")):
        try:
            loaded.append(np.load(out_dir / name, mmap_mode=mmap))
        except (ValueError, OSError, EOFError) as e:
            raise ArtifactError(f"{out_dir / name} is damaged ({e}); {redo}") from e
    if len(loaded[0]) != len(loaded[1]):
        raise ArtifactError(f"{out_dir / emb}: {len(loaded[1])} rows for {len(loaded[0])} ids in {ids}; {redo}")
    return loaded[0], loaded[1]


def iter_shards(out_dir: str | Path, verify: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, memory-mapped embeddings) per finished shard, refusing an incomplete set or a shard whose files
    changed since it was written. Sizes are always checked, the sha256 with `verify`: it reads every shard
    (a full MS MARCO at float16 is some 13 GB, 10 s or so), little beside building an index or mining."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir, KIND, hint=HINT)
    cfg = manifest["config"]
    n_shards = (cfg["count"] + cfg["shard_size"] - 1) // cfg["shard_size"]
    missing = [s for s in range(n_shards) if not _finished(out_dir, s, "files" in manifest)]
    if missing:
        raise ArtifactError(f"{out_dir}: {len(missing)} of {n_shards} shards missing; run "
                            "python -m biencoder.encode again to finish them")
    for s in range(n_shards):
        yield _load_shard(out_dir, s, verify)


def collection_inputs(dataset: Dataset, model_dir: str | Path) -> dict[str, str]:
    return {"collection": file_fingerprint(dataset.collection_path), "model": model_fingerprint(model_dir)}


def ranks() -> tuple[int, int, Callable[[], None]]:
    """(rank, world size, barrier) under a launcher (`deepspeed`, `torchrun`: RANK, WORLD_SIZE, MASTER_ADDR
    and MASTER_PORT set), or a world of one; several ranks meet over gloo, which every device has."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return rank, world, lambda: None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world)
    return rank, world, dist.barrier


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biencoder.encode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="trained bi-encoder (default: <run.dir>/<biencoder.name>/model)")
    parser.add_argument("--out", help="shard directory (default: <run.dir>/<biencoder.name>/embeddings)")
    add_config_args(parser)
    add_dataset_args(parser, split=None)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = load_section(args.config, "data", DataConfig, args.overrides)
    config = load_section(args.config, "encode", EncodeConfig, args.overrides)
    base = stage_dir(args.config, args.overrides, "biencoder")
    args.split = args.split or data.dev_split
    dataset = dataset_from_args(args, default_root=data.root)
    model_dir = Path(args.model or base / "model")
    out = Path(args.out or base / "embeddings")
    if config.threads:
        torch.set_num_threads(config.threads)
    rank, world, barrier = ranks()
    model = BiEncoder.load(model_dir)
    if torch.cuda.is_available():
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    start = time.perf_counter()
    passages = list(dataset.iter_collection())
    encode_collection(model, passages, out, config, collection_inputs(dataset, model_dir), rank, world,
                      barrier=barrier)
    print(f"encoded {len(passages)} passages into {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
