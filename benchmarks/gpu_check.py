"""Exercise every GPU path once on small data and print what each costs.

    python -m benchmarks.gpu_check [--config configs/mini.yaml] [--layers 2] [--out runs/gpu-check]
    python -m benchmarks.gpu_check --cpu ...    # the same checks on the CPU (tests this script)

Checks, each against a CPU or torch reference:
  install       the `gpu` extra: torch sees CUDA, faiss-gpu sees a GPU, onnxruntime has the CUDA provider
  faiss         exact inner-product search on the GPU vs faiss-cpu's answer (20k x 256 vectors)
  onnx-fp16     the cross-encoder exported fp32 and fp16; fp16 scored by onnxruntime (CUDA) vs torch fp32
  encode        query and passage encoding throughput (bf16 where fast) vs fp32 CPU embeddings
  generate      query generation throughput (KV cache, sampling) on the device
  train         a bf16 DeepSpeed (ZeRO-2) training step of the bi-encoder under the `deepspeed` launcher

The models are the configured base LM cut to `--layers` layers and untrained: the figures are costs and
agreement, not quality. Writes <out>/gpu_check.json; exits 1 if any check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from irbase.artifacts import atomic_write_json, environment
from irbase.config import add_config_args, load_section, parse_config_args
from irbase.dataset import Dataset
from irbase.lm import BaseLMConfig, bf16_fast
from irbase.runconfig import DataConfig

REPO = Path(__file__).resolve().parents[1]


class Check:
    """What one check needs: the device, the base LM, a sample of real text, a scratch folder."""

    def __init__(self, device: torch.device, base_lm: BaseLMConfig, data: Dataset, out: Path, config: str):
        self.device, self.base_lm, self.out, self.config = device, base_lm, out, config
        self.data = data
        collection = data.collection
        self.passages = [collection[p] for p in sorted(collection)[:256]]
        self.queries = list(data.all_queries.values())[:256]


def check_install(c: Check) -> dict[str, Any]:
    import faiss
    import onnxruntime as ort

    found = {"torch_cuda": torch.cuda.is_available(), "cuda_devices": torch.cuda.device_count(),
             "faiss_gpus": getattr(faiss, "get_num_gpus", lambda: 0)(),
             "onnxruntime_providers": ort.get_available_providers(),
             "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if c.device.type == "cuda":
        missing = [name for name, ok in (("torch CUDA", found["torch_cuda"]), ("faiss-gpu", found["faiss_gpus"] > 0),
                   ("onnxruntime CUDA provider", "CUDAExecutionProvider" in found["onnxruntime_providers"])) if not ok]
        if missing:
            raise RuntimeError(f"the gpu extra is incomplete: {', '.join(missing)} not available "
                               "(make install EXTRA=gpu)")
    return found


def check_faiss(c: Check) -> dict[str, Any]:
    import faiss

    rng = np.random.default_rng(0)
    base = rng.standard_normal((20_000, 256), dtype=np.float32)
    queries = rng.standard_normal((100, 256), dtype=np.float32)
    cpu = faiss.IndexFlatIP(256)
    cpu.add(base)
    start = time.perf_counter()
    cpu_scores, cpu_ids = cpu.search(queries, 10)
    cpu_ms = (time.perf_counter() - start) * 1000
    index = faiss.index_cpu_to_all_gpus(cpu) if c.device.type == "cuda" else cpu
    index.search(queries[:1], 10)  # warm-up
    start = time.perf_counter()
    scores, ids = index.search(queries, 10)
    device_ms = (time.perf_counter() - start) * 1000
    same = float(np.mean(ids == cpu_ids))
    gap = float(np.abs(scores - cpu_scores).max())
    if same < 0.99 or gap > 1e-3:
        raise RuntimeError(f"GPU search disagrees with faiss-cpu: {same:.3f} of ids equal, max score gap {gap:.2e}")
    return {"ids_equal": same, "max_score_gap": gap, "cpu_ms": cpu_ms, "device_ms": device_ms}


def check_onnx(c: Check) -> dict[str, Any]:
    from crossencoder.export import ExportConfig, export_variants
    from crossencoder.model import CrossEncoder, CrossEncoderConfig
    from crossencoder.runtime import OnnxReranker

    base = BaseLMConfig(**{**vars(c.base_lm), "bidirectional": True})
    model = CrossEncoder.from_base(CrossEncoderConfig(base_lm=base)).eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)  # an untrained head scores all pairs alike: spread them
    groups = [(q, c.passages[i % 4 * 8:i % 4 * 8 + 8] or c.passages[:8]) for i, q in enumerate(c.queries[:8])]
    variants = ["fp32", "fp16"] if c.device.type == "cuda" else ["fp32"]
    reports = export_variants(model, c.out / "onnx", ExportConfig(variants=variants), groups)
    runtime = OnnxReranker(c.out / "onnx" / variants[-1], use_gpu=c.device.type == "cuda")
    pairs = c.passages[:100]
    runtime.score(c.queries[0], pairs[:10])
    start = time.perf_counter()
    runtime.score(c.queries[0], pairs)
    ms = (time.perf_counter() - start) * 1000
    return {"provider": runtime.provider, "variant": variants[-1],
            "parity": {v: {k: reports[v][k] for k in ("max_abs", "spearman", "top1_agreement")} for v in variants},
            "ms_per_100_pairs": ms, "pairs_per_s": 100 / (ms / 1000)}


def check_encode(c: Check) -> dict[str, Any]:
    from biencoder.model import BiEncoder, BiEncoderConfig

    model = BiEncoder.from_base(BiEncoderConfig(base_lm=BaseLMConfig(**{**vars(c.base_lm), "bidirectional": True})))
    reference = model.eval().encode(c.queries[:32], "query")
    model.to(c.device)
    bf16 = bf16_fast(c.device)
    out = {"bf16": bf16}
    for kind, texts in (("query", c.queries), ("passage", c.passages)):
        model.encode(texts[:8], kind, bf16=bf16)
        sync(c.device)
        start = time.perf_counter()
        emb = model.encode(texts, kind, batch_size=64, bf16=bf16)
        sync(c.device)
        out[f"{kind}_per_s"] = len(texts) / (time.perf_counter() - start)
        if kind == "query":
            out["min_cosine_vs_cpu_fp32"] = float(np.min(np.sum(emb[:32] * reference, axis=1)))
    if out["min_cosine_vs_cpu_fp32"] < 0.99:
        raise RuntimeError(f"device embeddings differ from CPU fp32: min cosine {out['min_cosine_vs_cpu_fp32']:.4f}")
    return out


def check_generate(c: Check) -> dict[str, Any]:
    from querygen.data import PromptEncoder, vocab_ids
    from querygen.model import GeneratorConfig, QueryGenerator
    from querygen.sampling import SamplingConfig, sample, stop_tokens

    config = GeneratorConfig(base_lm=BaseLMConfig(**{**vars(c.base_lm), "bidirectional": False}), train_layers=None)
    from irbase.lm import load_tokenizer, resolve
    tokenizer = load_tokenizer(resolve(config.base_lm))
    encoder = PromptEncoder(tokenizer, config.prompt, config.passage_max_tokens, config.query_max_tokens)
    model = QueryGenerator.from_base(config, vocab_ids(tokenizer, c.passages + c.queries, encoder)).to(c.device)
    model.eval()
    prompts = encoder.prompts(c.passages[:64])
    stop, sampling = stop_tokens(model), SamplingConfig(per_passage=3, max_new_tokens=20)
    with torch.autocast(c.device.type, dtype=torch.bfloat16, enabled=bf16_fast(c.device)):
        sample(model, prompts[:4], sampling, torch.Generator().manual_seed(0), stop)
        sync(c.device)
        start = time.perf_counter()
        decoded = sum(sample(model, prompts[i:i + 32], sampling, torch.Generator().manual_seed(i), stop)[1]
                      for i in range(0, len(prompts), 32))
        sync(c.device)
    seconds = time.perf_counter() - start
    return {"passages_per_s": len(prompts) / seconds, "tokens_per_s": decoded / seconds, "batch": 32}


def check_train(c: Check) -> dict[str, Any]:
    """Five bi-encoder steps under `deepspeed --num_gpus 1 --module biencoder.train` on 64 real train queries."""
    data, run = c.out / "train-data", c.out / "train-run"
    qrels = {q: j for q, j in list(c.data.qrels.items())[:64]}
    pids = sorted({p for j in qrels.values() for p in j} | set(sorted(c.data.collection)[:256]))
    _write(data / "collection.tsv", [(p, c.data.collection[p]) for p in pids])
    _write(data / "queries.train.tsv", [(q, c.data.all_queries[q]) for q in qrels])
    _write(data / "qrels.train.tsv", [(q, 0, p, r) for q, j in qrels.items() for p, r in j.items()])
    ds = "zero2_bf16.json" if c.device.type == "cuda" else "cpu_fp32.json"
    config = c.out / "train.yaml"
    config.write_text(json.dumps({
        "extends": str(Path(c.config).resolve()), "run": {"dir": str(run.resolve()), "seed": 13},
        "data": {"root": str(data.resolve()), "dev_split": "train"},
        "biencoder": {"name": "check", "model": {"base_lm": vars(c.base_lm)}, "negatives": {"files": []},
                      "synthetic": {"queries": None, "qrels": None}, "final_eval": "none",
                      "train": {"deepspeed_config": str(REPO / "configs" / "deepspeed" / ds), "batch_size": min(8, len(qrels) // 2),
                                "max_steps": 5, "save_every": 100, "log_every": 1}}}))
    launcher = Path(sys.executable).with_name("deepspeed")
    command = [str(launcher), "--num_gpus", "1", "--module", "biencoder.train", "--config", str(config)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-1500:]}")
    log = [json.loads(line) for line in (run / "check" / "train_log.jsonl").open()]
    losses = [r["loss"] for r in log]
    if len(log) != 5 or not np.all(np.isfinite(losses)):
        raise RuntimeError(f"expected 5 logged steps with finite losses, got {losses}")
    recorded = json.loads((run / "check" / "train_config.json").read_text())
    return {"precision": recorded["precision"], "losses": losses,
            "examples_per_s_after_first": float(np.median([r["examples_per_s"] for r in log[1:]]))}


def _write(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CHECKS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "install": check_install, "faiss": check_faiss, "onnx-fp16": check_onnx, "encode": check_encode,
    "generate": check_generate, "train": check_train}


def run_checks(check: Check, names: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        start = time.perf_counter()
        try:
            result, status = CHECKS[name](check), "ok"
        except Exception as error:  # a failed check is reported beside the others, not raised
            result, status = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}, "FAILED"
        rows.append({"check": name, "status": status, "seconds": time.perf_counter() - start, **result})
        print(f"{name:<10} {status:<7} {rows[-1]['seconds']:7.1f} s  "
              + json.dumps({k: v for k, v in result.items() if k != "traceback"}, default=str)[:400], flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run every check on the CPU (no GPU needed)")
    parser.add_argument("--layers", type=int, default=2, help="base-LM layers kept (default: %(default)s)")
    parser.add_argument("--base-lm", help="base LM name or folder (default: the recipe's biencoder base LM)")
    parser.add_argument("--out", default="runs/gpu-check", help="scratch and report folder (default: %(default)s)")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS), metavar="CHECK")
    add_config_args(parser)
    args = parse_config_args(parser, argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("torch sees no CUDA device: install the gpu extra on a GPU machine, or pass --cpu")
    device = torch.device("cpu" if args.cpu else "cuda")
    from biencoder.train import BiEncoderRecipe
    recipe = load_section(args.config, "biencoder", BiEncoderRecipe, args.overrides)
    base = BaseLMConfig(**{**vars(recipe.model.base_lm), "num_layers": args.layers,
                           **({"name": args.base_lm} if args.base_lm else {})})
    data = load_section(args.config, "data", DataConfig, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(device, base, Dataset.from_dir(data.root, data.train_split), out, args.config)
    rows = run_checks(check, args.only)
    atomic_write_json(out / "gpu_check.json", {"device": str(device), "environment": environment(), "checks": rows})
    failed = [r["check"] for r in rows if r["status"] != "ok"]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
