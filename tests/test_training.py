"""DeepSpeed training end to end on a tiny model, in subprocesses as a user runs it: an interrupted run
resumes from its last checkpoint and ends with the same weights as an uninterrupted one."""
import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import write_train_dev

REPO = Path(__file__).resolve().parents[1]


def _setup(tmp_path: Path, lm: Path, max_steps: int, save_every: int) -> Path:
    data = tmp_path / "data"
    write_train_dev(data, tmp_path / "mined.tsv")
    config = tmp_path / "config.yaml"
    config.write_text(f"""
run: {{dir: {tmp_path / 'run'}, seed: 7}}
data: {{root: {data}}}
biencoder:
  model: {{base_lm: {{name: {lm}, num_layers: 2, bidirectional: true}}, passage_max_length: 32}}
  train: {{deepspeed_config: {REPO / 'configs/deepspeed/cpu_fp32.json'}, batch_size: 2, max_steps: {max_steps},
          save_every: {save_every}, log_every: 5, learning_rate: 0.001, threads: 1}}
  negatives: {{files: ["{tmp_path / 'mined.tsv'}"], per_query: 1}}
encode: {{batch_size: 4, shard_size: 4, dtype: float32, bf16: false}}
""")
    return config


def _train(config: Path, *overrides: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "biencoder.train", "--config", str(config), *overrides],
                            cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_killed_training_resumes_to_identical_weights(tmp_path, tiny_decoder):
    steps = 120
    reference = _setup(tmp_path / "a", tiny_decoder, steps, save_every=10)
    out, _ = _train(reference).communicate(timeout=600)
    assert "recall@1=" in out, out[-2000:]

    interrupted = _setup(tmp_path / "b", tiny_decoder, steps, save_every=10)
    latest = tmp_path / "b" / "run" / "biencoder" / "checkpoints" / "latest.json"
    proc = _train(interrupted, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["global_step"] >= 30:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be interrupted"
    assert not (tmp_path / "b" / "run" / "biencoder" / "model").exists()
    killed_at = json.loads(latest.read_text())["global_step"]
    assert 30 <= killed_at < steps

    # a changed recipe must not splice onto these checkpoints (a longer max_steps would re-stretch the LR)
    refused = _train(interrupted, f"biencoder.train.max_steps={2 * steps}", "biencoder.train.threads=2")
    out, _ = refused.communicate(timeout=600)
    assert refused.returncode == 2 and "train.max_steps: 120 -> 240" in out and "Traceback" not in out, out[-2000:]
    assert "threads" not in out.split("another config")[1].split(")")[0]  # a harmless change is not named
    assert json.loads(latest.read_text())["global_step"] == killed_at

    out, _ = _train(interrupted).communicate(timeout=600)
    assert f"resumed from step-{killed_at:07d}" in out, out[-2000:]
    a = load_file(tmp_path / "a" / "run" / "biencoder" / "model" / "query" / "model.safetensors")
    b = load_file(tmp_path / "b" / "run" / "biencoder" / "model" / "query" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-6, key
    log = [json.loads(line) for line in (tmp_path / "b" / "run" / "biencoder" / "train_log.jsonl").open()]
    assert log[-1]["step"] == steps and {"loss", "lr", "examples_per_s"} <= set(log[-1])
    assert [r["step"] for r in log] == list(range(5, steps + 1, 5))  # no step logged twice after the resume
    evaluation = json.loads((tmp_path / "b" / "run" / "biencoder" / "eval.json").read_text())
    assert set(evaluation["dev"]) >= {"recall@1", "mrr@10", "recall@100"}
    recorded = json.loads((tmp_path / "b" / "run" / "biencoder" / "train_config.json").read_text())
    assert recorded["precision"] == "fp32" and recorded["total_steps"] == steps
    kept = sorted(p.name for p in latest.parent.glob("step-*"))
    assert kept == [f"step-{steps - 10:07d}", f"step-{steps:07d}"]  # keep_checkpoints=2, older removed


def test_a_second_round_names_its_first_round_under_run_dir(tmp_path, tiny_decoder):
    """`biencoder.init_from` takes `{run_dir}` like every other path key of the recipe."""
    config = _setup(tmp_path, tiny_decoder, max_steps=4, save_every=100)
    out, _ = _train(config, "biencoder.final_eval=none").communicate(timeout=600)
    assert (tmp_path / "run" / "biencoder" / "model" / "biencoder.json").is_file(), out[-2000:]
    round2 = _train(config, "biencoder.name=r2", 'biencoder.init_from="{run_dir}/biencoder/model"',
                    "biencoder.train.max_steps=2", "biencoder.final_eval=none")
    out, _ = round2.communicate(timeout=600)
    assert round2.returncode == 0, out[-2000:]
    assert f"continuing the data stream of {tmp_path / 'run' / 'biencoder' / 'model'} after 8 examples" in out
    recorded = json.loads((tmp_path / "run" / "r2" / "train_config.json").read_text())
    assert recorded["recipe"]["init_from"] == str(tmp_path / "run" / "biencoder" / "model")
    # a round over other queries (here a slice) must not skip the start of its own stream
    other = ("biencoder.name=r2b", 'biencoder.init_from="{run_dir}/biencoder/model"', "biencoder.max_train_queries=3",
             "biencoder.train.max_steps=2", "biencoder.final_eval=none")
    refused = _train(config, *other)
    out, _ = refused.communicate(timeout=600)
    assert refused.returncode == 2 and "continue_data=false" in out and "Traceback" not in out, out[-2000:]
    fresh = _train(config, *other, "biencoder.continue_data=false")
    out, _ = fresh.communicate(timeout=600)
    assert fresh.returncode == 0 and "continuing the data stream" not in out, out[-2000:]


def test_a_build_lock_left_by_a_killed_compile_is_cleared_and_a_live_one_kept(tmp_path, monkeypatch):
    """A killed JIT compile of DeepSpeed's op leaves torch's `lock` behind, and every later training waited
    on it forever; an old lock goes with its half-built folder, a young one (a compile under way) stays."""
    import time

    from irbase.training import STALE_BUILD_LOCK_S, clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    killed, building, built = (tmp_path / "py311_cpu" / name for name in ("shm_op", "adam_op", "done_op"))
    for folder in (killed, building, built):
        folder.mkdir(parents=True)
        (folder / "shm.o").write_bytes(b"half")
    (killed / "lock").touch()
    (building / "lock").touch()
    old = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(killed / "lock", (old, old))
    assert clear_stale_build_locks() == [killed]
    assert not killed.exists() and (building / "lock").is_file() and (built / "shm.o").is_file()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "absent"))
    assert clear_stale_build_locks() == []


def test_config_changes_by_hand():
    from irbase.training import config_changes

    old = {"train": {"max_steps": 10, "threads": 1, "lr": 0.1}, "recipe": {"eval": {"queries": 5}, "seed": 1}}
    new = {"train": {"max_steps": 20, "threads": 4, "lr": 0.1}, "recipe": {"eval": {"queries": 9}, "seed": 1,
                                                                            "extra": True}}
    assert config_changes(old, new) == ["recipe.extra: None -> True", "train.max_steps: 10 -> 20"]
    assert config_changes(old, old) == []


ENTRY_POINTS = ["biencoder.train", "biencoder.encode", "biencoder.index", "biencoder.mine", "biencoder.evaluate",
                "crossencoder.train", "crossencoder.evaluate", "crossencoder.export", "querygen.train", "querygen.generate", "querygen.filter",
                "pipeline.build", "pipeline.search", "benchmarks.run", "tuning.sweep", "benchmarks.compare",
                "benchmarks.rerank", "benchmarks.load", "tuning.fusion", "benchmarks.paired", "benchmarks.soak",
                "irbase.bm25", "irbase.download", "irbase.slice"]
LAUNCHED = ["biencoder.train", "crossencoder.train", "querygen.train", "biencoder.encode"]  # by `deepspeed`
_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*|-[a-z])(?![\w-])")


def documented_usage(module: str) -> list[str]:
    """The command lines the module's docstring shows (indented `python -m M ...` or `deepspeed ... --module M
    ...` with their continuation lines, or quoted in the prose), each from just after the module name."""
    doc = ast.get_docstring(ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text()))
    lines, usage = doc.splitlines(), []
    for i, line in enumerate(lines):
        found = re.search(rf"(?:python -m|--module) {re.escape(module)}(?![\w.])(.*)", line)
        if found and line.startswith("    "):
            text = found.group(1)
            for more in lines[i + 1:]:  # a continuation: indented deeper, not a command of its own
                if not more.startswith("     ") or "python -m" in more or "deepspeed" in more:
                    break
                text += " " + more.strip()
            usage.append(text)
        usage += re.findall(rf"`python -m {re.escape(module)}(?![\w.])([^`]*)`", line)  # one quoted in prose
    return usage


# One interpreter runs every `python -m M [sub] --help` (as __main__, with that argv): the same parse a user's
# command does, without paying torch's import once per entry point.
HELP_CHILD = r"""
import contextlib, io, json, runpy, sys
answers = []
for argv in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [argv[0], *argv[1:], "--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException as error:
            import traceback
            traceback.print_exc()
            code = 1
    answers.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(answers))
"""


def _helps(argvs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    done = subprocess.run([sys.executable, "-c", HELP_CHILD, json.dumps(argvs)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [subprocess.CompletedProcess(argv, a["returncode"], a["stdout"], a["stderr"])
            for argv, a in zip(argvs, json.loads(done.stdout.splitlines()[-1]))]


@pytest.fixture(scope="module")
def helps() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """--help of every entry point, then of each subcommand their --help lists."""
    top = dict(zip(ENTRY_POINTS, _helps([[m] for m in ENTRY_POINTS])))
    subs = [[m, sub] for m, result in top.items() for sub in _subcommands(result.stdout)]
    return {**{(m,): r for m, r in top.items()}, **{tuple(a): r for a, r in zip(subs, _helps(subs) if subs else [])}}


def _subcommands(help_text: str) -> list[str]:
    found = re.search(r"^positional arguments:\n +\{([\w,-]+)\}", help_text, re.M)
    return found.group(1).split(",") if found else []


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_entry_points_have_help(module, helps):
    """`python -m M --help` as a user types it: exit 0, the usage names M, and every option the module's
    docstring shows in its command lines is one the parser has (a documented flag that was renamed or
    dropped would make the documented command exit 2)."""
    usage = documented_usage(module)
    assert usage, f"{module}'s docstring shows no `python -m {module}` command line"
    result = helps[(module,)]
    assert result.returncode == 0 and result.stderr.count("Traceback") == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: python -m {module} "), result.stdout[:200]
    subcommands = _subcommands(result.stdout)
    checked = 0
    for line in usage:
        line = line.split(" #")[0]  # a shell comment beside the command
        words = line.split()
        text = result.stdout
        if subcommands:  # e.g. `irbase.bm25 search --config ...`: the options are the subcommand's
            assert words and words[0] in subcommands, (line, subcommands)
            sub = helps[(module, words[0])]
            assert sub.returncode == 0 and sub.stdout.startswith(f"usage: python -m {module} {words[0]} ")
            text = sub.stdout
        for option in _OPTION.findall(line):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), \
                f"{module}: the docstring shows {option} ({line.strip()!r}); --help does not list it"
            checked += 1
    assert checked, f"{module}: its documented command lines show no option (not even --config)"


class _Parsed(Exception):
    """Raised by a stand-in for the first thing a command does after parsing its arguments."""


@pytest.mark.parametrize("module", LAUNCHED)
def test_the_deepspeed_launcher_argument_is_accepted(module, monkeypatch, tmp_path):
    """`deepspeed --module M a b` runs `python -u -m M --local_rank=<rank> a b` (deepspeed/launcher/launch.py):
    argparse must take the extra flag, not exit 2 before the job starts. The job itself is replaced by a
    stand-in that records what the command line parsed to."""
    import importlib
    import importlib.util

    launcher = (Path(importlib.util.find_spec("deepspeed").origin).parent / "launcher" / "launch.py").read_text()
    assert '"--local_rank={local_rank}"' in launcher  # the form this test passes it in, before the user's
    entry = importlib.import_module(module)
    seen = []

    def stand_in(*args, **kwargs):
        # a trainer hands train(config, overrides); encode's first step is load_section(config, "data", cls,
        # overrides)
        seen.append((args[0], list(args[-1])))
        raise _Parsed

    monkeypatch.setattr(entry, "load_section" if module == "biencoder.encode" else "train", stand_in)
    config = str(tmp_path / "c.yaml")
    argv = ["--local_rank=0", "--config", config, "run.seed=3", "encode.batch_size=2"]
    with pytest.raises(_Parsed):
        entry.main(argv)
    assert seen == [(config, ["run.seed=3", "encode.batch_size=2"])]
    with pytest.raises(_Parsed):  # the separate-value form a hand-written launcher may use
        entry.main(["--config", config, "--local_rank", "1"])
    assert seen[-1] == (config, [])
    with pytest.raises(SystemExit) as refused:  # an unknown flag still exits 2: the parser is not lenient
        entry.main(["--local-rank-typo=0", "--config", config])
    assert refused.value.code == 2 and len(seen) == 2


@pytest.mark.parametrize("avx512_bf16, amx", [(False, False), (True, False), (True, True)])
def test_bf16_autocast_only_where_the_cpu_has_amx(monkeypatch, tmp_path, tiny_encoder, avx512_bf16, amx):
    """Without AMX, bf16 lost to fp32 on both CPUs measured (emulated: 42x; AVX512-BF16 alone: 1.5x)."""
    import torch

    from biencoder.encode import EncodeConfig, encode_collection
    from biencoder.model import BiEncoder, BiEncoderConfig
    from irbase import lm
    from irbase.artifacts import read_manifest
    from irbase.lm import BaseLMConfig
    from irbase.training import TrainConfig, deepspeed_config

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    native = amx
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm._cpu_amx.cache_clear()
    try:
        assert lm.bf16_fast("cpu") is native
        ds_path = Path(__file__).parents[1] / "configs/deepspeed/cpu_bf16.json"
        ds = deepspeed_config(TrainConfig(deepspeed_config=str(ds_path)), 1)
        assert ds["torch_autocast"]["enabled"] is native and ds["torch_autocast"]["dtype"] == "bfloat16"
        # the embeddings' manifest records the precision used, not the one asked for
        model = BiEncoder.from_base(BiEncoderConfig(base_lm=BaseLMConfig(name=str(tiny_encoder))))
        out = encode_collection(model, [("p1", "a passage"), ("p2", "another passage")], tmp_path / "emb",
                                EncodeConfig(bf16=True, dtype="float32"), {"collection": "c", "model": "m"})
        assert read_manifest(out, "embeddings")["config"]["bf16"] is native
    finally:
        lm._cpu_amx.cache_clear()  # later tests see the real CPU


_CONTINUED = r"""
import json, sys, torch
from irbase.training import Trainer, TrainConfig

class Source:  # 10 micro-batches of 4 examples per epoch; records which ones training asked for
    def __init__(self):
        self.seen = []
    def micro_batches_per_epoch(self, world_size):
        return 10
    def batches(self, epoch, skip, rank, world_size):
        for index in range(skip, 10):
            self.seen.append([epoch, index])
            yield {"x": torch.full((4, 2), float(index)), "num_examples": 4}

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)
    def forward(self, x, num_examples):
        return self.linear(x).pow(2).mean()

source = Source()
trainer = Trainer(Model(), TrainConfig(deepspeed_config=sys.argv[1], batch_size=4, max_steps=5, data_offset=28,
                                       save_every=100, log_every=1), sys.argv[2], source)
trainer.train()
print(json.dumps({"seen": source.seen, "position": trainer.stream_position}))
"""


def test_a_continued_run_starts_the_stream_where_the_first_stopped(tmp_path):
    """Round 2 used to replay round 1's batches (same seed, same epoch 0) and never reach the rest."""
    result = subprocess.run([sys.executable, "-c", _CONTINUED, str(REPO / "configs/deepspeed/cpu_fp32.json"),
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # 28 examples = 7 micro-batches of 4: the rest of epoch 0, then epoch 1 from its start
    assert out["seen"] == [[0, 7], [0, 8], [0, 9], [1, 0], [1, 1]]
    assert out["position"] == 28 + 5 * 4


def test_stream_position_of_an_init_model(tmp_path):
    from biencoder.train import stream_position
    from irbase.training import ResumeRefused

    model = tmp_path / "r1" / "model"
    model.mkdir(parents=True)
    (model / "biencoder.json").write_text(json.dumps({"stream_position": 8000, "query_stream": "abc"}))
    assert stream_position(model, "abc") == 8000
    with pytest.raises(ResumeRefused, match="another query stream"):
        stream_position(model, "other")  # e.g. a synthetic-only first round before a real one
    (model / "biencoder.json").write_text(json.dumps({}))  # saved before positions were recorded
    with pytest.raises(ValueError, match="continue_data=false"):
        stream_position(model, "abc")
    (tmp_path / "r1" / "checkpoints").mkdir()
    (tmp_path / "r1" / "checkpoints" / "latest.json").write_text(json.dumps({"tag": "step-0000250", "examples": 7968}))
    assert stream_position(model, "abc") == 7968
