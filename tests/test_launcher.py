"""The GPU launch path, run on CPU ranks: the exact `deepspeed` commands the README prints, with two
processes over gloo, for sharded encoding and for training; and every tensor handed to the engine is on
the engine's device."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from biencoder.encode import iter_shards
from biencoder.model import BiEncoder, BiEncoderConfig
from irbase.lm import BaseLMConfig
from tests.conftest import PASSAGES, write_train_dev, write_tsv

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).with_name("deepspeed")


def readme_command(module: str) -> list[str]:
    """The launch command the README prints for `module`, as argv (without its --config and after)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(r"^(deepspeed .*?--module " + re.escape(module) + r")(?: |$)", text, re.M)
    assert found, f"the README prints no deepspeed command for {module}"
    return found.group(1).split()


def launch(module: str, ranks: int, *args: str, port: int) -> subprocess.CompletedProcess:
    argv = readme_command(module)
    assert argv[:3] == ["deepspeed", "--num_gpus", "4"] and argv[3:] == ["--module", module], argv
    # On a CPU box the launcher's accelerator is the CPU: --num_gpus N starts N ranks over gloo.
    command = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(port), *argv[3:], *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": f"{DEEPSPEED.parent}:"
           f"{os.environ.get('PATH', '')}"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_readme_launch_commands_use_the_runner_module_flag():
    for module in ("biencoder.train", "biencoder.encode", "querygen.train"):
        argv = readme_command(module)
        assert "-m" not in argv  # the DeepSpeed runner has --module; `-m` is "unrecognized arguments"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_encoding_equals_one_rank(tmp_path, tiny_encoder):
    model = BiEncoder.from_base(BiEncoderConfig(base_lm=BaseLMConfig(name=str(tiny_encoder))))
    model.save(tmp_path / "model")
    many = {f"x{i}-{j}": f"{text} number {i}" for i in range(5) for j, text in enumerate(PASSAGES.values())}
    write_tsv(tmp_path / "data" / "collection.tsv", many.items())
    write_tsv(tmp_path / "data" / "queries.dev.tsv", [("q", "text")])
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{dir: {tmp_path}}}\ndata: {{root: {tmp_path / 'data'}}}\n"
                      "encode: {batch_size: 4, shard_size: 4, dtype: float32, bf16: false}\n")
    common = ["--config", str(config), "--model", str(tmp_path / "model")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "biencoder.encode", *common, "--out", str(tmp_path / "one")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    # stale shards from another model are cleared by rank 0 before any rank writes (replace_stale is the
    # build's; here the second rank must not start before the manifest exists)
    two = launch("biencoder.encode", 2, *common, "--out", str(tmp_path / "two"), port=_free_port())
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a = {pid: vec for ids, emb in iter_shards(tmp_path / "one") for pid, vec in zip(ids, np.asarray(emb))}
    b = {pid: vec for ids, emb in iter_shards(tmp_path / "two") for pid, vec in zip(ids, np.asarray(emb))}
    assert sorted(a) == sorted(b) == sorted(many)
    assert max(float(np.abs(a[p] - b[p]).max()) for p in a) < 1e-5
    shards = sorted((tmp_path / "two").glob("emb-*.npy"))
    assert len(shards) == 8  # 30 passages in shards of 4: ranks 0 and 1 wrote four each


def _train_config(tmp_path: Path, lm: Path, accum: int) -> Path:
    data = tmp_path / "data"
    write_train_dev(data, tmp_path / "mined.tsv")
    config = tmp_path / "config.yaml"
    config.write_text(f"""
run: {{dir: {tmp_path / 'run'}, seed: 7}}
data: {{root: {data}}}
biencoder:
  model: {{base_lm: {{name: {lm}, num_layers: 2, bidirectional: true}}, passage_max_length: 32}}
  train: {{deepspeed_config: {REPO / 'configs/deepspeed/cpu_fp32.json'}, batch_size: 1, grad_accum: {accum},
          max_steps: 4, save_every: 2, log_every: 1, learning_rate: 0.001, threads: 1}}
  negatives: {{files: ["{tmp_path / 'mined.tsv'}"], per_query: 1}}
  final_eval: none
""")
    return config


def test_two_rank_training_equals_one_process_and_resumes(tmp_path, tiny_decoder):
    """Two ranks of one query each step on the same two queries as one process of one query with two
    accumulated micro-batches (EpochOrder hands rank r the micro-batch 2i + r), and DeepSpeed averages the
    ranks' gradients as accumulation averages micro-batches: the weights must agree to float rounding."""
    two = _train_config(tmp_path / "two", tiny_decoder, accum=1)
    first = launch("biencoder.train", 2, "--config", str(two), port=_free_port())
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "two" / "run" / "biencoder"
    assert json.loads((run / "train_config.json").read_text())["world_size"] == 2
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["global_step"] == 4 and latest["examples"] == 8
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").open()] == [1, 2, 3, 4]
    again = launch("biencoder.train", 2, "--config", str(two), port=_free_port())
    assert again.returncode == 0 and "resumed from step-0000004" in again.stdout + again.stderr

    one = _train_config(tmp_path / "one", tiny_decoder, accum=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "biencoder.train", "--config", str(one)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file
    a = load_file(run / "model" / "query" / "model.safetensors")
    b = load_file(tmp_path / "one" / "run" / "biencoder" / "model" / "query" / "model.safetensors")
    base = load_file(Path(tiny_decoder) / "model.safetensors")
    moved = max((a[k] - base[k]).abs().max().item() for k in a if k in base)
    assert moved > 1e-3  # training changed the weights, so agreement below means something
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


class _Engine(torch.nn.Module):
    """Stands in for DeepSpeed's engine on a device the data does not start on."""

    def __init__(self, module, device):
        super().__init__()
        self.module, self.device, self.seen = module, torch.device(device), []

    def forward(self, **batch):
        self.seen.append({k: v.device for k, v in batch.items() if torch.is_tensor(v)})
        return torch.zeros((), requires_grad=True)

    def backward(self, loss):
        pass

    def step(self):
        pass

    def save_checkpoint(self, path, tag, client_state, save_latest):
        Path(path, tag).mkdir(parents=True)


_port_before = os.environ.get("MASTER_PORT")


def test_every_tensor_reaches_the_engine_on_its_device(tmp_path, monkeypatch):
    import deepspeed

    from irbase.training import TrainConfig, Trainer

    class Source:
        def micro_batches_per_epoch(self, world):
            return 3

        def batches(self, epoch, skip, rank, world):
            for _ in range(skip, 3):
                yield {"ids": torch.ones(2, 3, dtype=torch.long), "mask": torch.ones(2, 3), "num_examples": 2}

    import irbase.training

    engine = _Engine(torch.nn.Linear(2, 2), "meta")
    monkeypatch.setattr(deepspeed, "initialize",
                        lambda model, optimizer, lr_scheduler, config: (engine, optimizer, None, lr_scheduler))
    # no process group in the test process: it would hold its port and leave RANK/MASTER_PORT set for the
    # subprocesses of later tests
    monkeypatch.setattr(irbase.training, "init_distributed", lambda: (0, 1))
    saved = []
    monkeypatch.setattr(Trainer, "_save", lambda self, engine, state, rank: saved.append(state["global_step"]))
    config = TrainConfig(deepspeed_config=str(REPO / "configs/deepspeed/cpu_fp32.json"), batch_size=2, max_steps=3,
                         save_every=10)
    Trainer(torch.nn.Linear(2, 2), config, tmp_path, Source()).train()
    assert len(engine.seen) == 3 and saved == [3]
    assert os.environ.get("MASTER_PORT") == _port_before  # nothing leaks into later tests
    assert all(device.type == "meta" for seen in engine.seen for device in seen.values())


def test_gpu_check_script_runs_every_check_on_the_cpu(tmp_path, tiny_decoder):
    """`python -m benchmarks.gpu_check --cpu` takes the code paths a GPU run takes (the launcher, the export
    and its parity check, faiss against faiss, encoding and generation), so the script cannot rot unseen."""
    data = tmp_path / "data"
    write_train_dev(data, tmp_path / "mined.tsv")
    config = tmp_path / "c.yaml"
    config.write_text(f"run: {{dir: {tmp_path / 'run'}}}\ndata: {{root: {data}}}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PATH": f"{DEEPSPEED.parent}:{os.environ.get('PATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu", "--base-lm", str(tiny_decoder),
                           "--out", str(tmp_path / "out"), "--config", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    rows = {r["check"]: r for r in report["checks"]}
    assert set(rows) == {"install", "faiss", "onnx-fp16", "encode", "generate", "train"}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["faiss"]["ids_equal"] == 1.0 and rows["onnx-fp16"]["parity"]["fp32"]["max_abs"] < 1e-3
    assert rows["encode"]["min_cosine_vs_cpu_fp32"] > 0.999 and rows["generate"]["tokens_per_s"] > 0
    assert rows["train"]["precision"] == "fp32" and len(rows["train"]["losses"]) == 5
    assert "6 passed, 0 failed" in done.stdout
