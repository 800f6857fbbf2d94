"""Export a trained cross-encoder to ONNX (fp32; int8 by onnxruntime dynamic quantization for CPUs;
fp16 for GPUs), each variant checked against torch on a held batch before it is kept.

    python -m crossencoder.export --config configs/mini.yaml [--variants fp32 int8 fp16] [key=value ...]

Writes <run.dir>/<crossencoder.name>/onnx/<variant>/: model.onnx, tokenizer.json, pair_format.json,
vocab_map.npy (when the vocabulary is shrunk) and export.json (parity figures, model fingerprint, and the
size and sha256 of each of the other files, checked when the runtime loads them).
An export beyond tolerance is refused and nothing is written.
"""
from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from irbase.artifacts import (atomic_dir, atomic_write_json, environment, file_records, model_fingerprint,
                              scratch_dir)
from irbase.config import add_config_args, load_section, parse_config_args
from irbase.dataset import Dataset
from irbase.runconfig import DataConfig, stage_dir

from crossencoder.model import CrossEncoder
from crossencoder.vocab import VocabShrink, dataset_texts, shrink_embeddings

log = logging.getLogger(__name__)
VARIANTS = ("fp32", "int8", "fp16")
EXPORT_FILE = "export.json"


@dataclass
class Tolerance:
    max_abs: float        # largest |onnx - torch| logit difference allowed on the held batch
    min_spearman: float   # mean per-query rank correlation with torch's ordering


@dataclass
class ExportConfig:
    variants: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    opset: int = 18
    shrink_vocab: bool = True       # keep only tokens the corpus and queries produce (+ byte fallback)
    int8_ffn_down_fp32: bool = True  # keep the MLP down-projections fp32 in int8: their input has outliers
    int8_per_channel: bool = False   # per-output-channel weight scales (onnxruntime 1.32: worse here; report)
    check_queries: int = 8          # held batch: dev queries x passages (their positives + random ones)
    check_passages: int = 16
    tolerance: dict[str, Tolerance] = field(default_factory=lambda: {
        "fp32": Tolerance(1e-3, 0.999), "int8": Tolerance(2.5, 0.93), "fp16": Tolerance(0.05, 0.99)})


class ExportRefused(RuntimeError):
    """Every exported variant disagrees with torch beyond its tolerance."""


class _Refused(Exception):
    """Leaves one variant's atomic_dir without swapping it in."""


class _Logits(nn.Module):
    def __init__(self, model: CrossEncoder):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.logits(input_ids, attention_mask)


def held_batch(dataset: Dataset, n_queries: int, n_passages: int, seed: int) -> list[tuple[str, list[str]]]:
    """Fixed (query, passages) groups: each query's positives first, then random passages."""
    rng = random.Random(seed)
    qids = sorted(rng.sample(sorted(dataset.queries), min(n_queries, len(dataset.queries))))
    pids = sorted(dataset.collection)
    groups = []
    for qid in qids:
        chosen = [p for p in sorted(dataset.qrels[qid]) if p in dataset.collection][:n_passages]
        while len(chosen) < min(n_passages, len(pids)):
            pid = rng.choice(pids)
            if pid not in chosen:
                chosen.append(pid)
        groups.append((dataset.all_queries[qid], [dataset.collection[p] for p in chosen]))
    return groups


def parity(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
    """max |difference|, mean Spearman correlation per query, share of queries with the same top passage."""
    non_finite = int(sum(np.count_nonzero(~np.isfinite(c)) for c in candidate))
    if non_finite:  # a NaN fails no comparison and can drop out of max(): such an export is never "close"
        return {"max_abs": float("inf"), "spearman": float("nan"), "top1_agreement": 0.0, "non_finite": non_finite}
    diffs = [float(np.abs(r - c).max()) for r, c in zip(reference, candidate)]
    spearman = [_spearman(r, c) for r, c in zip(reference, candidate)]
    top1 = [float(np.argmax(r) == np.argmax(c)) for r, c in zip(reference, candidate)]
    return {"max_abs": max(diffs), "spearman": float(np.mean(spearman)), "top1_agreement": float(np.mean(top1)),
            "non_finite": 0}


def within(report: dict[str, float], tolerance: "Tolerance") -> bool:
    """Whether a parity report passes; written as what must hold, so a NaN anywhere fails."""
    return (report["non_finite"] == 0 and report["max_abs"] <= tolerance.max_abs
            and report["spearman"] >= tolerance.min_spearman)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return 1.0
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return 1.0
    return float(np.corrcoef(ra, rb)[0, 1])


def export_fp32(model: CrossEncoder, path: Path, opset: int) -> None:
    """Dynamo export with dynamic batch and sequence axes into `path` (model.onnx, one file)."""
    import onnx

    ids, mask = model.pairs.encode("a short query", ["a passage", "another passage that is a bit longer"])
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=2)
    with scratch_dir(path) as tmp:
        raw = tmp / "model.onnx"
        torch.onnx.export(_Logits(model).eval(), (torch.from_numpy(ids), torch.from_numpy(mask)), str(raw),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                          opset_version=opset, dynamo=True, verbose=False)
        onnx.save_model(onnx.load(str(raw)), str(path))  # weights inline: one file to move and map


def ffn_down_nodes(path: Path, intermediate_size: int, hidden_size: int) -> list[str]:
    """MatMuls whose constant weight maps the MLP width back to the hidden size: the down-projections.

    Found by weight shape because the dynamo exporter names nodes `node_linear_N`, not by module."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and len(n.input) == 2
            and shapes.get(n.input[1]) == (intermediate_size, hidden_size)]


def head_nodes(path: Path) -> list[str]:
    """The MatMul/Gemm nodes of the scoring head (weight `model.head.*`).

    Kept fp32 in int8: a hidden x 1 product saves nothing quantized, while quantizing its input (the pooled
    vector, per tensor) puts the whole error of the outlier-dominated range straight onto the logit."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer if t.name.startswith("model.head.")}
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & weights]


def quantize_int8(source: Path, target: Path, exclude: Sequence[str] = (), per_channel: bool = False) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs every tensor at INFO on the root logger
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=["MatMul", "Gemm", "Gather"],
                         # onnxruntime >= 1.32 rewrites a Gemm into `<name>_MatMul` + Add before excluding
                         nodes_to_exclude=[*exclude, *(f"{name}_MatMul" for name in exclude)])
    finally:
        root.setLevel(level)


def convert_fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save_model(converted, str(target))


def _files(directory: Path) -> list[str]:
    """The files of an export that export.json records (size, sha256) for the runtime to check."""
    return [f.name for f in directory.iterdir() if f.is_file() and f.name != EXPORT_FILE]


def _write_variant(exported: CrossEncoder, fp32: Path, path: Path, variant: str, config: ExportConfig) -> list[str]:
    """One variant's model.onnx from the fp32 graph; returns the nodes an int8 graph keeps in fp32."""
    if variant == "fp32":
        path.write_bytes(fp32.read_bytes())
        return []
    if variant == "int8":
        kept_fp32 = head_nodes(fp32)
        if config.int8_ffn_down_fp32:
            shape = exported.backbone.config
            kept_fp32 += ffn_down_nodes(fp32, shape.intermediate_size, shape.hidden_size)
        quantize_int8(fp32, path, kept_fp32, config.int8_per_channel)
        return kept_fp32
    convert_fp16(fp32, path)
    return []


def export_variants(model: CrossEncoder, out_dir: Path, config: ExportConfig,
                    groups: Sequence[tuple[str, list[str]]], shrink: VocabShrink | None = None,
                    extra: dict | None = None) -> dict[str, dict]:
    """Export, check and atomically write each variant.

    A variant beyond its tolerance is refused and not written (its report says why, `refused`), while the
    others still are, so one noisy quantization does not cost the build its fp32 model; ExportRefused is
    raised when every variant was refused."""
    from crossencoder.runtime import OnnxReranker

    for variant in config.variants:
        if variant not in VARIANTS:
            raise ValueError(f"export variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    model.eval()
    reference = [model.score(q, ps) for q, ps in groups]
    exported = model
    if shrink is not None:
        exported = shrink_embeddings(model, shrink)
    reports = {}
    with scratch_dir(out_dir) as tmp:  # beside the export, so a killed export's scratch is swept by the next
        fp32 = tmp / "fp32.onnx"
        start = time.perf_counter()
        export_fp32(exported, fp32, config.opset)
        export_seconds = time.perf_counter() - start
        for variant in config.variants:
            try:
                with atomic_dir(out_dir / variant) as stage:
                    kept_fp32 = _write_variant(exported, fp32, stage / "model.onnx", variant, config)
                    exported.pairs.save(stage)
                    runtime = OnnxReranker(stage, check_manifest=False)
                    report = parity(reference, [runtime.score(q, ps) for q, ps in groups])
                    tol = config.tolerance[variant]
                    report.update(variant=variant, provider=runtime.provider, tolerance=asdict(tol),
                                  fp32_nodes=kept_fp32,
                                  held_pairs=sum(len(ps) for _, ps in groups), export_seconds=export_seconds,
                                  size_mb=(stage / "model.onnx").stat().st_size / 2 ** 20)
                    if not within(report, tol):
                        reason = (f"{variant} export disagrees with torch beyond tolerance: "
                                  f"{report['non_finite']} non-finite scores, "
                                  f"max |diff| {report['max_abs']:.4g} (allowed {tol.max_abs}), "
                                  f"Spearman {report['spearman']:.4f} (needs >= {tol.min_spearman}); not saved")
                        log.error("%s", reason)
                        reports[variant] = {**report, "refused": reason}
                        raise _Refused
                    atomic_write_json(stage / EXPORT_FILE, {**report, "vocab": shrink.stats if shrink else None,
                                                            "environment": environment(), **(extra or {}),
                                                            "files": file_records(stage, _files(stage))})
                    reports[variant] = report
                    log.info("%s: max |diff| %.3g, Spearman %.4f, top-1 agreement %.2f, %.0f MB", variant,
                             report["max_abs"], report["spearman"], report["top1_agreement"], report["size_mb"])
            except _Refused:
                shutil.rmtree(out_dir / variant, ignore_errors=True)  # an older export is of another model
    if all("refused" in r for r in reports.values()):
        raise ExportRefused("; ".join(r["refused"] for r in reports.values()))
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crossencoder.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: export.variants of the config")
    add_config_args(parser)
    args = parse_config_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    data = load_section(args.config, "data", DataConfig, args.overrides)
    config = load_section(args.config, "export", ExportConfig, args.overrides)
    if args.variants:
        config.variants = args.variants
    stage = stage_dir(args.config, args.overrides, "crossencoder")
    model_dir = stage / "model"
    model = CrossEncoder.load(model_dir)
    dev = Dataset.from_dir(data.root, data.dev_split)
    shrink = None
    if config.shrink_vocab:
        shrink = VocabShrink.from_texts(model.pairs, dataset_texts(data.root))
        log.info("vocabulary: %d of %d tokens kept", shrink.stats["kept"], shrink.stats["original"])
    groups = held_batch(dev, config.check_queries, config.check_passages, seed=0)
    try:
        reports = export_variants(model, stage / "onnx", config, groups, shrink,
                                  extra={"model": model_fingerprint(model_dir), "model_dir": str(model_dir),
                                         "config": asdict(config)})
    except ExportRefused as e:
        print(f"python -m crossencoder.export: every variant refused, nothing written: {e}", file=sys.stderr)
        return 2
    for variant, r in reports.items():
        if "refused" in r:
            print(f"{variant}: REFUSED ({r['refused']})", file=sys.stderr)
            continue
        print(f"{variant}: max|diff| {r['max_abs']:.2e}  spearman {r['spearman']:.4f}  "
              f"top1 {r['top1_agreement']:.2f}  {r['size_mb']:.0f} MB -> {stage / 'onnx' / variant}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
