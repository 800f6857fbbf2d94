"""The DeepSpeed training loop both trained stages share: one process on a CPU, or
`deepspeed --num_gpus N --module <package>.train` on GPUs, with the same code.

The model's forward returns the loss. Data order is a pure function of (seed, epoch), so a run resumed
from its last checkpoint sees exactly the batches an uninterrupted run would have seen, and a run that
continues another (`data_offset`) sees the examples that one did not reach.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from tqdm import tqdm

from irbase.artifacts import atomic_write_json, atomic_write_text, to_jsonable
from irbase.lm import bf16_fast

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    deepspeed_config: str = "configs/deepspeed/cpu_bf16.json"  # ZeRO stage and precision
    batch_size: int = 16            # examples per micro-batch per process
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None    # optimizer steps; wins over epochs when set (0: save the untrained model)
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int | None = None   # optimizer steps between evaluations; None: only at the end
    threads: int | None = None      # torch CPU threads (None: torch's default)
    data_offset: int = 0            # examples of the seeded stream (epoch after epoch) to skip before step 1


class BatchSource(Protocol):
    def micro_batches_per_epoch(self, world_size: int) -> int: ...

    def batches(self, epoch: int, skip: int, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
        """This process's micro-batches of `epoch`, after skipping the first `skip`."""
        ...


# Settings a resumed run may change: they decide how it is watched or laid out on the hardware (chunk_rows:
# the same outputs in length-sorted chunks), not what it learns.
RESUMABLE_CHANGES = frozenset({"threads", "log_every", "save_every", "keep_checkpoints", "eval_every", "eval",
                               "final_eval", "proxy", "chunk_rows"})


class ResumeRefused(ValueError):
    """Checkpoints on disk were written by another recipe."""


def config_changes(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON trees, ignoring RESUMABLE_CHANGES."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for key in sorted(set(old) | set(new)) if key not in RESUMABLE_CHANGES
                for change in config_changes(old.get(key), new.get(key), f"{path}.{key}" if path else key)]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


# A JIT build of a torch extension takes seconds to a few minutes; a lock older than this was left by a kill.
STALE_BUILD_LOCK_S = 15 * 60


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """DeepSpeed compiles its ops through torch's JIT extension builder the first time a machine uses them
    (the CPU comm op on every CPU run). That builder holds a `lock` file while it compiles, and a process killed
    meanwhile never removes it: every later training then waits on it forever, silently. A lock older than
    any build takes is removed with its half-built folder, so the op is compiled afresh."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    cleared = []
    for lock in sorted(root.glob("**/lock")) if root.is_dir() else []:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # that build finished meanwhile
            continue
        if age > max_age_s:
            log.warning("removing %s: a torch extension build killed %.0f min ago left it", lock.parent, age / 60)
            shutil.rmtree(lock.parent, ignore_errors=True)
            cleared.append(lock.parent)
        else:
            log.info("%s is being built by another process (lock %.0f s old): waiting", lock.parent, age)
    return cleared


def init_distributed() -> tuple[int, int]:
    """Rank and world size; a plain `python -m` run becomes a world of one without MPI."""
    import deepspeed

    clear_stale_build_locks()
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    deepspeed.init_distributed(dist_backend=None)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def deepspeed_config(config: TrainConfig, world_size: int) -> dict[str, Any]:
    path = Path(config.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"train.deepspeed_config {path}: file not found")
    ds = json.loads(path.read_text(encoding="utf-8"))
    ds.update(train_micro_batch_size_per_gpu=config.batch_size, gradient_accumulation_steps=config.grad_accum,
              train_batch_size=config.batch_size * config.grad_accum * world_size,
              gradient_clipping=config.max_grad_norm, steps_per_print=10 ** 9)
    autocast = ds.get("torch_autocast", {})
    if (autocast.get("enabled") and "bfloat16" in str(autocast.get("dtype", "bfloat16"))
            and not torch.cuda.is_available() and not bf16_fast("cpu")):
        log.warning("train.deepspeed_config %s: this CPU has no AMX, where bf16 autocast is slower than "
                    "fp32 (emulated without AVX512-BF16: ~40x; with it: 1.5x); training in fp32", path)
        ds["torch_autocast"] = {**autocast, "enabled": False}
    ds.pop("optimizer", None)  # we pass torch's AdamW: no fused_adam build on CPU
    ds.pop("scheduler", None)
    return ds


def precision(ds: dict[str, Any]) -> str:
    """The precision a DeepSpeed config trains in, after `deepspeed_config` has gated bf16 autocast."""
    autocast = ds.get("torch_autocast", {})
    if ds.get("bf16", {}).get("enabled"):
        return "bf16 weights"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16 weights"
    return f"{autocast.get('dtype', 'bfloat16')} autocast" if autocast.get("enabled") else "fp32"


def param_groups(model: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
    """Trainable parameters; a model with a `param_groups(lr)` method (a fresh head beside a pretrained
    backbone) chooses its own learning rates."""
    if hasattr(model, "param_groups"):
        return model.param_groups(lr)
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The batch's tensors on `device` (the data sources build them on the CPU); other values as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def linear_schedule(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


class Trainer:
    """Runs the loop; `model(**batch)` must return the scalar loss."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, output_dir: str | Path,
                 source: BatchSource, evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
                 run_info: dict[str, Any] | None = None):
        self.model, self.config, self.source, self.evaluate = model, config, source, evaluate
        self.output_dir = Path(output_dir)
        self.checkpoints = self.output_dir / "checkpoints"
        self.run_info = run_info or {}
        self.stream_position: int | None = None  # examples of the stream consumed when training ended

    def _latest(self) -> dict[str, Any] | None:
        latest = self.checkpoints / "latest.json"
        return json.loads(latest.read_text()) if latest.is_file() else None

    def _save(self, engine, state: dict[str, Any], rank: int) -> None:
        import deepspeed.comm as dist

        tag = f"step-{state['global_step']:07d}"
        tmp_tag = f".tmp-{tag}"
        engine.save_checkpoint(str(self.checkpoints), tag=tmp_tag, client_state=state, save_latest=False)
        dist.barrier()
        if rank == 0:
            final = self.checkpoints / tag
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.checkpoints / tmp_tag, final)
            atomic_write_json(self.checkpoints / "latest.json", {"tag": tag, **state})
            kept = sorted(p for p in self.checkpoints.glob("step-*") if p.is_dir())
            for old in kept[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def train(self) -> torch.nn.Module:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        rank, world = init_distributed()
        micro_per_epoch = self.source.micro_batches_per_epoch(world)
        if micro_per_epoch == 0:
            raise ValueError(f"fewer training examples than one batch ({cfg.batch_size} x {world} processes)")
        steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
        total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * steps_per_epoch))
        ds = deepspeed_config(cfg, world)
        # recorded, so resuming on a machine that would train in another precision is refused like any recipe change
        run_record = to_jsonable({"train": cfg, "world_size": world, "total_steps": total,
                                  "precision": precision(ds), **self.run_info})
        latest = self._latest()
        self._refuse_another_recipe(latest, run_record)  # before DeepSpeed builds anything
        engine, scheduler = self._engine(ds, total)
        per_micro = cfg.batch_size * world
        per_epoch = micro_per_epoch * per_micro
        state = {"global_step": 0, "epoch": cfg.data_offset // per_epoch,
                 "micro_in_epoch": cfg.data_offset % per_epoch // per_micro, "micros": 0, "examples": 0}
        if latest:
            _, client = engine.load_checkpoint(str(self.checkpoints), tag=latest["tag"])
            state.update({k: client[k] for k in state})
            log.info("resumed from %s (step %d of %d)", latest["tag"], state["global_step"], total)
        log_path = self.output_dir / "train_log.jsonl"
        if rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.output_dir / "train_config.json", run_record)
            _truncate_log(log_path, state["global_step"])
            for stale in self.checkpoints.glob(".tmp-*"):  # a save that a kill cut short (a full model each)
                shutil.rmtree(stale, ignore_errors=True)
        self._loop(engine, scheduler, state, total, rank, world, log_path)
        self._save(engine, state, rank)
        self.stream_position = state["epoch"] * per_epoch + state["micro_in_epoch"] * per_micro
        return engine.module

    def _refuse_another_recipe(self, latest: dict[str, Any] | None, run_record: dict[str, Any]) -> None:
        recorded = self.output_dir / "train_config.json"
        if latest and recorded.is_file():
            changes = config_changes(json.loads(recorded.read_text()), run_record)
            if changes:  # resuming would splice two recipes (e.g. a new max_steps re-stretches the LR schedule)
                raise ResumeRefused(f"{self.checkpoints} holds checkpoints of another config "
                                    f"({'; '.join(changes)}): restore that config to resume, or move "
                                    f"{self.output_dir} away (or choose another run name) to train afresh")

    def _engine(self, ds: dict[str, Any], total: int):
        """The DeepSpeed engine over torch's AdamW and a linear warmup-decay schedule."""
        import deepspeed

        cfg = self.config
        optimizer = torch.optim.AdamW(param_groups(self.model, cfg.learning_rate), lr=cfg.learning_rate,
                                      weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, linear_schedule(max(total, 1), int(cfg.warmup_ratio * total)))
        engine, _, _, scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
        return engine, scheduler

    def _loop(self, engine, scheduler, state: dict[str, Any], total: int, rank: int, world: int,
              log_path: Path) -> None:
        """Optimizer steps until `total`, epoch after epoch; logs, evaluates and checkpoints on the way."""
        cfg = self.config
        bar = tqdm(total=total, initial=state["global_step"], desc="training", unit="step", disable=rank != 0)
        window = _LossWindow()
        engine.train()
        while state["global_step"] < total:
            for batch in self.source.batches(state["epoch"], state["micro_in_epoch"], rank, world):
                loss = engine(**to_device(batch, engine.device))  # the engine does not move its inputs
                engine.backward(loss)
                engine.step()
                state["micro_in_epoch"] += 1
                state["micros"] += 1
                examples = int(batch.get("num_examples", cfg.batch_size)) * world
                state["examples"] += examples
                window.add(loss.item(), examples)
                if state["micros"] % cfg.grad_accum:
                    continue  # DeepSpeed stepped the optimizer only at the accumulation boundary
                state["global_step"] += 1
                step = state["global_step"]
                bar.update()
                if step % cfg.log_every == 0 or step == total:
                    record = {"step": step, "epoch": state["epoch"], **window.flush(scheduler.get_last_lr()[0])}
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    if rank == 0:
                        _append_jsonl(log_path, record)
                if cfg.eval_every and step % cfg.eval_every == 0 and step != total and self.evaluate:
                    self._evaluate(engine, step, log_path, rank)
                if step % cfg.save_every == 0 and step != total:
                    self._save(engine, state, rank)
                if step >= total:
                    break
            else:
                state["epoch"] += 1
                state["micro_in_epoch"] = 0
        bar.close()

    def _evaluate(self, engine, step: int, log_path: Path, rank: int) -> None:
        engine.eval()
        with torch.no_grad():
            metrics = self.evaluate(engine.module)
        engine.train()
        if rank == 0:
            _append_jsonl(log_path, {"step": step, "eval": metrics, "time": time.time()})
        log.info("step %d eval: %s", step, metrics)


class _LossWindow:
    """Mean loss and throughput since the last log line."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.loss, self.n, self.examples, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, examples: int) -> None:
        self.loss, self.n, self.examples = self.loss + loss, self.n + 1, self.examples + examples

    def flush(self, lr: float) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        record = {"loss": self.loss / self.n, "lr": lr, "examples_per_s": self.examples / elapsed, "time": time.time()}
        self._reset()
        return record


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop what was logged after the checkpoint a run resumes from."""
    if log_path.is_file():
        kept = [line for line in log_path.read_text(encoding="utf-8").splitlines()
                if json.loads(line)["step"] <= step]
        atomic_write_text(log_path, "".join(line + "\n" for line in kept))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(to_jsonable(record)) + "\n")


def train_main(prog: str, doc: str | None, train: Callable[[str | None, Sequence[str]], Any],
               argv: Sequence[str] | None = None) -> int:
    """The command line every trainer shares: --config plus overrides, and the launcher's --local_rank."""
    import argparse

    from irbase.config import add_config_args

    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        train(args.config, args.overrides)
    except ResumeRefused as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0
