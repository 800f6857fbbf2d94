"""Write synthetic queries for every passage of the collection with the trained generator.

    python -m querygen.generate --config configs/mini.yaml [section.key=value ...]

Passages go in collection order, in shards of `shard_size`; each shard is sampled with its own seed
(run.seed, shard number) and written atomically, so an interrupted run resumes at the first missing shard
and a lost shard is written again exactly as before. When every shard exists they are merged into
<run.dir>/<querygen.name>/generated/queries.generated.tsv and qrels.generated.tsv (the MS MARCO layout:
`qid  text` and `qid  0  pid  1`, the pid being the passage the query was written for).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from irbase.artifacts import ArtifactError, atomic_write_text, file_fingerprint, model_fingerprint, read_manifest, \
    write_manifest
from irbase.config import add_config_args
from irbase.dataset import Dataset
from irbase.formats import read_queries
from irbase.lm import bf16_fast, compute_device

from querygen.data import PromptEncoder
from querygen.model import QueryGenerator
from querygen.sampling import SamplingConfig, sample, stop_tokens

log = logging.getLogger(__name__)
KIND = "generated-queries"
SPLIT = "generated"


@dataclass
class GenerateConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int = 16             # passages per forward (batch 32 was no faster on 2 cores)
    shard_size: int = 1024           # passages per resumable shard
    int8: bool = True                # CPU: dynamic int8 on the Linear layers (~2.8x faster on 2 cores)
    int8_head: bool = True           # the output head in int8 too (querygen.evaluate measures both)
    int8_keep_fp32: list[str] = field(default_factory=lambda: ["down_proj"])  # Linear layers kept fp32 (name suffix)
    threads: int | None = 2
    # the first N passages only, rounded up to whole shards (smoke runs, or a first look): shards do not
    # depend on it, so a later full run keeps them and goes on
    max_passages: int | None = None


def output_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / name / "generated"


def quantize(model: QueryGenerator, head: bool = True, keep_fp32: Sequence[str] = ()) -> QueryGenerator:
    """A copy with dynamic int8 weights, per output channel, in the backbone's Linear layers (but those
    whose name ends with one of `keep_fp32`) and (with `head`) the sliced output head; activations are
    quantized per batch. CPU only. Per channel: on the untuned base LM it cost +0.27 query NLL/token
    against +0.39 per tensor (shared/notes/generation-cost.md)."""
    import copy

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    quantized = copy.deepcopy(model)
    spec = {name: per_channel_dynamic_qconfig for name, module in quantized.backbone.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith(tuple(keep_fp32))}
    quantized.backbone = quantize_dynamic(quantized.backbone, spec, dtype=torch.qint8)
    if head:
        quantized.head = quantize_dynamic(torch.nn.Sequential(quantized.head), {torch.nn.Linear:
                                          per_channel_dynamic_qconfig}, dtype=torch.qint8)[0]
    return quantized


def shard_path(out: Path, shard: int) -> Path:
    return out / "shards" / f"shard-{shard:05d}.tsv"


def _shards(dataset: Dataset, size: int, limit: int | None) -> Iterator[list[tuple[str, str]]]:
    passages = islice(dataset.iter_collection(), limit)
    while chunk := list(islice(passages, size)):
        yield chunk


def _clean(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def generate_shard(model: QueryGenerator, encoder: PromptEncoder, passages: list[tuple[str, str]],
                   config: GenerateConfig, seed: int, shard: int, stop: torch.Tensor,
                   bar: tqdm) -> tuple[str, int]:
    """The shard's TSV text (`pid  j  query` per line) and the tokens it decoded."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{shard}".encode()))
    n = config.sampling.per_passage
    prompts = encoder.prompts([text for _, text in passages])
    # batches of similar length: the prefill is most of the work and pads each batch to its longest prompt
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    lines: list[str] = [""] * len(passages)
    decoded = 0
    for start in range(0, len(order), config.batch_size):
        chunk = order[start:start + config.batch_size]
        tokens, count = sample(model, [prompts[i] for i in chunk], config.sampling, generator, stop)
        decoded += count
        for k, i in enumerate(chunk):
            queries = [_clean(model.tokenizer.decode(ids, skip_special_tokens=True))
                       for ids in tokens[k * n:(k + 1) * n]]
            lines[i] = "".join(f"{passages[i][0]}\t{j}\t{q}\n" for j, q in enumerate(queries))
        bar.update(len(chunk))
    return "".join(lines), decoded


def check_or_write_manifest(out: Path, config: dict, inputs: dict[str, str]) -> None:
    """Shards on disk must come from this generator, collection and sampling config."""
    if (out / "manifest.json").is_file():
        manifest = read_manifest(out, KIND)
        if manifest["config"] != config or manifest["inputs"] != inputs:
            raise ArtifactError(f"{out} holds queries generated with another generator, collection or config; "
                                f"move it away to generate afresh")
        return
    write_manifest(out, KIND, config, inputs)


def generate(config_path: str | None, overrides: Sequence[str]) -> Path:
    from querygen.train import load_recipe

    run, data, recipe = load_recipe(config_path, overrides)
    config = recipe.generate
    if config.threads:
        torch.set_num_threads(config.threads)
    model_dir = Path(run.dir) / recipe.name / "model"
    model = QueryGenerator.load(model_dir).to(compute_device())
    dataset = Dataset.from_dir(data.root, data.train_split)
    out = output_dir(run.dir, recipe.name)
    recorded = {k: v for k, v in asdict(config).items() if k not in ("threads", "max_passages")}
    check_or_write_manifest(out, {"generate": recorded, "seed": run.seed},
                            {"generator": model_fingerprint(model_dir),
                             "collection": file_fingerprint(dataset.collection_path)})
    encoder = PromptEncoder(model.tokenizer, model.config.prompt, model.config.passage_max_tokens,
                            model.config.query_max_tokens)
    stop = stop_tokens(model)
    quantized = config.int8 and model.device.type == "cpu"
    if quantized:
        model = quantize(model, head=config.int8_head, keep_fp32=config.int8_keep_fp32)
    model.eval()
    bf16 = bf16_fast(model.device) and not quantized  # int8 dynamic kernels take fp32 activations only
    limit = None if config.max_passages is None else -(-config.max_passages // config.shard_size) * config.shard_size
    total = sum(1 for _ in islice(dataset.iter_collection(), limit))
    bar = tqdm(total=total, desc="generating", unit="passage")
    start, decoded = time.perf_counter(), 0
    for shard, passages in enumerate(_shards(dataset, config.shard_size, limit)):
        path = shard_path(out, shard)
        if path.is_file():
            bar.update(len(passages))
            continue
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
            text, count = generate_shard(model, encoder, passages, config, run.seed, shard, stop, bar)
        atomic_write_text(path, text)
        decoded += count
        elapsed = time.perf_counter() - start
        bar.set_postfix(tokens_per_s=f"{decoded / elapsed:.0f}")
    bar.close()
    merge(out, total, config.shard_size)
    return out


def merge(out: Path, passages: int, shard_size: int) -> None:
    """The shards of the first `passages` -> queries.generated.tsv and qrels.generated.tsv (written
    atomically, queries first)."""
    queries, qrels = [], []
    for path in [shard_path(out, i) for i in range(-(-passages // shard_size))]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split("\t")
            if len(parts) != 3:
                raise ArtifactError(f"{path}:{number}: expected pid, sample and query, found {len(parts)} columns")
            pid, j, query = parts
            if query:
                qid = f"gen-{pid}-{j}"
                queries.append(f"{qid}\t{query}\n")
                qrels.append(f"{qid}\t0\t{pid}\t1\n")
    atomic_write_text(out / f"queries.{SPLIT}.tsv", "".join(queries))
    atomic_write_text(out / f"qrels.{SPLIT}.tsv", "".join(qrels))
    log.info("%d queries for %d passages -> %s", len(queries), passages, out)


def read_generated(out: Path) -> dict[str, str]:
    return read_queries(out / f"queries.{SPLIT}.tsv")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m querygen.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = generate(args.config, args.overrides)
    except ArtifactError as error:
        print(f"python -m querygen.generate: error: {error}", file=sys.stderr)
        return 2
    print(f"generated queries in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
