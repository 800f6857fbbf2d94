"""Build the whole system from a config, as named stages:

    python -m pipeline.build --config configs/mini.yaml [--only|--upto STAGE ...] [--force STAGE ...] [key=value ...]

[slice (when the config has a `slice` section: configs/smoke.yaml),] base-lm, [querygen (the query
generator), generate (its queries for every passage), filter (when the config has a `querygen` section),]
bm25-negatives, [synthetic-negatives (BM25 negatives of the generated queries, when biencoder.synthetic
names them),] biencoder (round 1), mine, biencoder-r2, crossencoder, export, corpus (encoding, HNSW index,
passage store; records the served cross-encoder), fusion (the first stage's BM25 weight fitted on
dev-large, written into the run), sweep (rerank depth, variant and reranker weight fitted together on
dev-large against p95, written into the run), benchmark (`Retriever()` on dev). A stage whose recorded key
(its command, the config sections it reads, and the keys of the stages whose outputs it reads) is unchanged and whose
outputs exist is skipped; an interrupted stage is simply run again and resumes (training from its last
checkpoint, encoding from its last finished shard). Stage records live in <run.dir>/stages/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

from irbase.artifacts import atomic_write_json, model_fingerprint, to_jsonable
from irbase.bm25 import BM25Config
from irbase.config import ConfigError, add_config_args, load_section, load_yaml, parse_config_args
from irbase.dataset import Dataset
from irbase.runconfig import DataConfig, RunConfig, fill_path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BuildConfig:
    """The recipe's `build` section; every field lives in the YAML (configs/mini.yaml), none here."""
    round2: list[str]          # overrides that turn biencoder into round 2 (its name, start, negatives)
    benchmark_split: str       # the split the final benchmark reports on
    fusion: list[str]          # arguments of python -m tuning.fusion: the first stage's BM25 weight
    sweep: list[str]           # arguments of python -m tuning.sweep: depth, variant and reranker weight


@dataclass
class Stage:
    name: str
    sections: list[str]                      # config sections whose values decide the outputs
    outputs: list[str]                       # paths (relative to run.dir) that must exist when done
    command: list[str] | None = None         # a `python -m` command line, or
    action: Callable[[], None] | None = None  # an in-process step
    needs: list[str] = field(default_factory=list)  # stages whose outputs it reads: their keys enter its own


SYNTHETIC_NEGATIVES = "negatives.synthetic.bm25.tsv"  # under run.dir; a recipe lists it in biencoder.negatives.files
# What a plain BM25 index depends on: the stages that judge or mine with the plain index (filter,
# bm25-negatives) do not read the expansion keys, so turning expansion on rebuilds only what serves it
BM25_PLAIN = [f"bm25.{f.name}" for f in fields(BM25Config) if not f.name.startswith("expansion")]


class Builder:
    def __init__(self, config_path: str, overrides: Sequence[str]):
        self.config_path, self.overrides = config_path, list(overrides)
        self.raw = load_yaml(config_path, self.overrides)
        self.run = load_section(config_path, "run", RunConfig, self.overrides)
        self.data = load_section(config_path, "data", DataConfig, self.overrides)
        self.build = load_section(config_path, "build", BuildConfig, self.overrides)
        self.run_dir = Path(self.run.dir)
        self.r2 = [o.format(run_dir=self.run.dir, data_root="{data_root}") for o in self.build.round2]
        self.r2_name = next((o.split("=", 1)[1] for o in self.r2 if o.startswith("biencoder.name=")), None)
        if self.r2_name is None:
            raise ConfigError(f"{config_path}:build.round2 must name the round-2 model (biencoder.name=...)")
        slice_ = [Stage("slice", ["slice", "data"], [], self.cli("irbase.slice"))] if "slice" in self.raw else []
        synthetic = self._synthetic_stages()
        self.stages = [*slice_, *self._model_stages(synthetic), *self._serving_stages(bool(synthetic))]
        if slice_:  # every other stage reads the slice's data
            for stage in self.stages[1:]:
                stage.needs.insert(0, "slice")
        for i, stage in enumerate(self.stages):
            earlier = {s.name for s in self.stages[:i]}
            if not set(stage.needs) <= earlier:
                raise ValueError(f"stage {stage.name} needs {sorted(set(stage.needs) - earlier)}, which do not run "
                                 "before it")

    def cli(self, module: str, *options: str, overrides: Sequence[str] = (), pinned: Sequence[str] = (),
            command: str | None = None) -> list[str]:
        """`python -m module [command] [options] --config C [overrides]`: the stage's own overrides (round
        2) come before the user's, so the user's win, and `pinned` ones after, so they hold; options never
        sit next to the overrides, where a `nargs='+'` option would swallow them."""
        return [sys.executable, "-m", module, *([command] if command else []), *options, "--config",
                self.config_path, *overrides, *self.overrides, *pinned]

    def _synthetic_stages(self) -> list[Stage]:
        """The query generator, its queries for every passage, and the filter's decisions."""
        if "querygen" not in self.raw:
            return []
        qg, cli = self.raw["querygen"].get("name", "querygen"), self.cli
        return [
            Stage("querygen", ["data", "querygen.model", "querygen.train", "querygen.holdout", "querygen.eval_pairs"],
                  [f"{qg}/model", f"{qg}/eval.json"], cli("querygen.train"), needs=["base-lm"]),
            Stage("generate", ["data", "querygen.generate"], [f"{qg}/generated/queries.generated.tsv"],
                  cli("querygen.generate"), needs=["querygen"]),
            Stage("filter", ["data", *BM25_PLAIN, "querygen.filter", "querygen.holdout"],
                  [f"{qg}/filtered/decisions.tsv"], cli("querygen.filter"), needs=["generate"])]

    def _model_stages(self, synthetic: list[Stage]) -> list[Stage]:
        """Base LM, generator, both bi-encoder rounds, the cross-encoder and its export."""
        cli, r2 = self.cli, self.r2_name
        ce = self.raw.get("crossencoder", {}).get("name", "crossencoder")
        negatives = self._synthetic_negatives(cli)
        trained_on = ["base-lm", "bm25-negatives", *(["synthetic-negatives"] if negatives else [])]
        reads_queries = ["filter"] if synthetic and self._section("crossencoder.synthetic.queries") else []
        return [
            Stage("base-lm", ["biencoder.model.base_lm", "crossencoder.model.base_lm", "querygen.model.base_lm"], [],
                  action=self._base_lm),
            *synthetic,
            Stage("bm25-negatives", ["data", *BM25_PLAIN], ["negatives.bm25.tsv"],  # as measured: the plain index
                  cli("irbase.bm25", command="mine", pinned=["bm25.expansion=null"])),
            *negatives,
            Stage("biencoder", ["data", "biencoder", "encode"], ["biencoder/model", "biencoder/eval.json"],
                  cli("biencoder.train"), needs=trained_on),
            Stage("mine", ["data", "encode"], ["negatives.biencoder.tsv"], cli("biencoder.mine"), needs=["biencoder"]),
            Stage("biencoder-r2", ["data", "biencoder", "encode", "build.round2"],
                  [f"{r2}/model", f"{r2}/eval.json"], cli("biencoder.train", overrides=self.r2),
                  needs=[*trained_on, "biencoder", "mine"]),
            Stage("crossencoder", ["data", "crossencoder"], [f"{ce}/model", f"{ce}/eval.json"],
                  cli("crossencoder.train"),
                  needs=["base-lm", "bm25-negatives", "mine", "biencoder-r2", *reads_queries]),
            Stage("export", ["data", "export"], [f"{ce}/onnx"], cli("crossencoder.export"), needs=["crossencoder"])]

    def _serving_stages(self, synthetic: bool) -> list[Stage]:
        """The served corpus and index, the fits written into the run, and the dev benchmark."""
        cli, build = self.cli, self.build
        expanded_by = ["filter"] if synthetic and self._section("bm25.expansion") else []
        return [
            Stage("corpus", ["data", "encode", "index", "bm25", "pipeline"],
                  ["pipeline.json", "corpus/index", "corpus/passages.sqlite"], action=self._corpus,
                  needs=["biencoder", "biencoder-r2", "export", *expanded_by]),
            Stage("fusion", ["data", "build.fusion", "pipeline"],
                  [f"tuning/fusion-{_split(build.fusion, 'dev-large')}"],
                  cli("tuning.fusion", *build.fusion), needs=["corpus"]),
            Stage("sweep", ["data", "build.sweep", "pipeline"],
                  [f"tuning/sweep-{_split(build.sweep, self.data.dev_split)}"],
                  cli("tuning.sweep", *build.sweep), needs=["fusion"]),
            Stage("benchmark", ["data", "benchmark", "pipeline"], [f"benchmarks/pipeline-{build.benchmark_split}"],
                  cli("benchmarks.run", "--system", "pipeline", "--split", build.benchmark_split), needs=["sweep"])]

    def _synthetic_negatives(self, cli) -> list[Stage]:
        """When the bi-encoder trains on generated queries: their BM25 hard negatives, mined from the index
        expanded with those queries when `bm25.expansion` is set (the first stage the recipe serves)."""
        synthetic = (self.raw.get("biencoder", {}).get("synthetic") or {})
        if not synthetic.get("queries"):
            return []
        queries, qrels = (fill_path(synthetic[k], self.run.dir, self.data.root) for k in ("queries", "qrels"))
        out = self.run_dir / SYNTHETIC_NEGATIVES
        return [Stage("synthetic-negatives", ["data", "bm25", "biencoder.synthetic"], [SYNTHETIC_NEGATIVES],
                      cli("irbase.bm25", "--queries", queries, "--qrels", qrels, "--out", str(out), command="mine"),
                      needs=["filter"] if "querygen" in self.raw else [])]

    def _section(self, dotted: str):
        node = self.raw
        for part in dotted.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        return node

    def key(self, stage: Stage, keys: dict[str, str]) -> str:
        """A digest of what decides the stage's outputs: its command, the config it reads, and the keys of
        the stages it needs (so a change flows down the graph, and only down it)."""
        command = list((stage.command or [])[1:])
        n = len(self.overrides)
        for i in range(len(command) - n + 1) if n else ():  # the user's overrides count through the sections
            if command[i:i + n] == self.overrides:
                command = command[:i] + command[i + n:]
                break
        payload = {"command": command, "sections": {s: self._section(s) for s in ["run", *stage.sections]},
                   "needs": {name: keys[name] for name in stage.needs if name in keys}}
        return hashlib.sha256(json.dumps(to_jsonable(payload), sort_keys=True).encode()).hexdigest()[:16]

    def _base_lm(self) -> None:
        from irbase.lm import BaseLMConfig, resolve

        for section in ("biencoder", "crossencoder", "querygen"):
            base = self._section(f"{section}.model.base_lm")
            if base:
                print(f"{section}: base LM at {resolve(BaseLMConfig(**base))}")

    def _corpus(self) -> None:
        """Record what the run serves, from the recipe alone (the fusion and sweep stages, which need this
        one, fit their weights and depth again on top of it: nothing tuned for other models or settings is
        carried over), then store and index the collection."""
        from biencoder.encode import EncodeConfig
        from biencoder.index import IndexConfig
        from irbase.bm25 import BM25Config, resolved
        from pipeline.config import RunRecord, ServingConfig
        from pipeline.retriever import Retriever

        serving = load_section(self.config_path, "pipeline", ServingConfig, self.overrides)
        RunRecord(
            serving=serving,
            fingerprints={"biencoder": model_fingerprint(self.run_dir / serving.biencoder / "model"),
                          "crossencoder": model_fingerprint(self.run_dir / serving.crossencoder / "model")},
            encode=asdict(load_section(self.config_path, "encode", EncodeConfig, self.overrides)),
            index=asdict(load_section(self.config_path, "index", IndexConfig, self.overrides)),
            bm25=asdict(resolved(load_section(self.config_path, "bm25", BM25Config, self.overrides), self.run.dir,
                                 self.data.root))).save(self.run_dir)
        print(f"{self.run_dir / 'pipeline.json'}: the recipe's pipeline settings, until the fusion and sweep stages "
              "fit theirs", flush=True)
        dev = Dataset.from_dir(self.data.root, self.data.dev_split)
        retriever = Retriever(self.run_dir, depth=0)
        retriever.embed_and_store_corpus(dev.collection_path, embeddings_dir=self.run_dir / serving.biencoder
                                         / "embeddings")

    def with_needs(self, names: Sequence[str]) -> list[str]:
        """`names` and every stage they read from, transitively: what `--upto` runs."""
        by_name, chosen, todo = {s.name: s for s in self.stages}, set(), list(names)
        while todo:
            name = todo.pop()
            if name not in by_name:
                raise SystemExit(f"unknown stage {name!r}; stages: {', '.join(by_name)}")
            if name not in chosen:
                chosen.add(name)
                todo.extend(by_name[name].needs)
        return [s.name for s in self.stages if s.name in chosen]

    def run_all(self, only: Sequence[str] = (), force: Sequence[str] = ()) -> list[dict]:
        known = [s.name for s in self.stages]
        for name in [*only, *force]:
            if name not in known:
                raise SystemExit(f"unknown stage {name!r}; stages: {', '.join(known)}")
        records_dir = self.run_dir / "stages"
        summary, keys = [], {}
        for stage in self.stages:
            key = keys[stage.name] = self.key(stage, keys)
            record_path = records_dir / f"{stage.name}.json"
            recorded = json.loads(record_path.read_text()) if record_path.is_file() else {}
            outputs_exist = all((self.run_dir / o).exists() for o in stage.outputs)
            if only and stage.name not in only:
                summary.append({"stage": stage.name, "status": "not selected", "seconds": 0.0})
                continue
            if recorded.get("key") == key and outputs_exist and stage.name not in force:
                print(f"== {stage.name}: up to date, skipped")
                summary.append({"stage": stage.name, "status": "skipped", "seconds": 0.0})
                continue
            print(f"== {stage.name}: " + (shlex.join(stage.command[1:]) if stage.command else "running"), flush=True)
            start = time.perf_counter()
            if stage.command:
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                               os.environ.get("PYTHONPATH")]))}
                result = subprocess.run(stage.command, cwd=os.getcwd(), env=env)
                if result.returncode != 0:
                    raise SystemExit(f"stage {stage.name} failed (exit {result.returncode}); fix it and run the "
                                     "same command again: finished stages are skipped, this one resumes")
            else:
                stage.action()
            seconds = time.perf_counter() - start
            atomic_write_json(record_path, {"key": key, "seconds": seconds, "finished": time.time()})
            summary.append({"stage": stage.name, "status": "ran", "seconds": seconds})
        return summary


def _split(args: Sequence[str], default: str) -> str:
    """The --split a stage's benchmark arguments name (where its outputs go)."""
    return args[args.index("--split") + 1] if "--split" in args[:-1] else default


def print_summary(summary: list[dict], run_dir: Path, split: str) -> None:
    print("\nstage            status        minutes")
    for row in summary:
        print(f"{row['stage']:<16} {row['status']:<13} {row['seconds'] / 60:7.1f}")
    print(f"total                          {sum(r['seconds'] for r in summary) / 60:7.1f}")
    results = run_dir / "benchmarks" / f"pipeline-{split}" / "results.json"
    if results.is_file():
        saved = json.loads(results.read_text())
        metrics = saved.get("metrics", {})
        latency = saved.get("latency_ms", {})
        print(f"\n{split}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
              + "  " + "  ".join(f"{k} {latency[k]:.0f} ms" for k in ("p50", "p95", "p99") if k in latency))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=[], metavar="STAGE", help="run just these stages")
    parser.add_argument("--upto", nargs="+", default=[], metavar="STAGE",
                        help="run these stages and the stages they read from (e.g. --upto biencoder-r2)")
    parser.add_argument("--force", nargs="+", default=[], metavar="STAGE", help="run these even if up to date")
    add_config_args(parser)
    args = parse_config_args(parser, argv)
    if not args.config:
        parser.error("--config is required (e.g. configs/mini.yaml, or configs/smoke.yaml to try it in minutes)")
    builder = Builder(args.config, args.overrides)
    only = [*args.only, *builder.with_needs(args.upto)] if args.upto else args.only
    summary = builder.run_all(only, args.force)
    print_summary(summary, builder.run_dir, builder.build.benchmark_split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
