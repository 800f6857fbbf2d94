"""YAML configs mapped onto dataclasses, with `section.key=value` overrides from the command line.

Each package owns its section's dataclass; a YAML file may hold several sections. Unknown keys
are errors so a typo never silently falls back to a default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One YAML file; `extends: other.yaml` (relative to it) starts from that file, merged key by key."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found" + (f" (extended by {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `extends` cycle through {', '.join(map(str, seen))}")
    with open(path, encoding="utf-8") as f:
        loaded = yaml.safe_load(f)
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping, found {type(loaded).__name__}")
    data = loaded or {}
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return _merge(_read(path.parent / parent, seen + (path.resolve(),)), data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_yaml(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML mapping and apply `a.b.c=value` overrides (values parsed as YAML scalars)."""
    data: dict[str, Any] = _read(Path(path)) if path is not None else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
        try:
            node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML (quote it, e.g. "
                              f"{dotted}='\"{raw}\"'): {str(e).splitlines()[0]}") from None
    return data


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str) -> T:
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    missing = [f.name for f in fields.values() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in data]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    return cls(**kwargs)


def read_saved_config(path: Path, file: str, section: str, cls: type[T], what: str,
                      train_module: str) -> tuple[T, dict[str, Any]]:
    """A saved model's recipe (`section` of its `file`, as the dataclass `cls`) and its whole record. A folder
    without the record is refused naming the folder and the command that trains one."""
    record = Path(path) / file
    if not record.is_file():
        raise FileNotFoundError(f"{path} is not a saved {what} (no {file}); train one with: "
                                f"python -m {train_module} --config configs/mini.yaml")
    saved = json.loads(record.read_text(encoding="utf-8"))
    return from_dict(cls, saved.get(section), str(record)), saved


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, where) if len(non_none) == 1 else value
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or hint is tuple else items
    if origin is dict and len(args) == 2:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(args[0], k, where): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads `3e-4` (no dot) as a string; a user writing it means the number.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def load_section(path: str | Path | None, name: str, cls: type[T], overrides: Sequence[str] = ()) -> T:
    """One section of a YAML config as dataclass `cls`; a missing section gives the defaults."""
    data = load_yaml(path, overrides)
    return from_dict(cls, data.get(name), f"{path or '<defaults>'}:{name}")


def add_config_args(parser: argparse.ArgumentParser, default: str = "configs/mini.yaml") -> None:
    """`--config FILE` plus trailing `section.key=value` overrides, the same on every entry point."""
    parser.add_argument("--config", default=default, help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="section.key=value",
                        help="config overrides, e.g. bm25.k1=1.2 run.dir=runs/exp1")


OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")  # section.key=value, never an option or a stage name


def parse_config_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args` with the `section.key=value` overrides taken out first, wherever they stand: an
    option that takes several values (`--upto STAGE ...`, `--concurrency 1 4 16`) would otherwise swallow the
    overrides that follow it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args([a for a in argv if not OVERRIDE.match(a)])
    args.overrides = [a for a in argv if OVERRIDE.match(a)]
    return args
