"""Property-based fuzzing (Hypothesis) of what users feed the system without a model: data files and
command-line config overrides. Every case is either read correctly or refused with an error naming the file
and line (readers) or the key (overrides); no other exception escapes. The queries, `k` and `depth` of
`Retriever.search` and the HTTP requests are fuzzed in `tests/test_serve.py`, beside the tiny run they need."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from irbase.config import ConfigError, load_section
from irbase.formats import DataFormatError, iter_collection, iter_top1000, iter_triples, read_qrels, read_queries
from irbase.negatives import read_negatives

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

READERS = {"collection": lambda p, lenient: list(iter_collection(p, lenient)),
           "queries": read_queries, "qrels": read_qrels, "negatives": read_negatives,
           "triples": lambda p, lenient: list(iter_triples(p, lenient)),
           "top1000": lambda p, lenient: list(iter_top1000(p, lenient))}

# text with the characters that break readers: tabs, newlines, NUL, CR, non-ASCII, lone surrogates excluded
# (they cannot be encoded); bytes add invalid UTF-8
FIELD = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
LINE = st.one_of(st.lists(FIELD, min_size=0, max_size=6).map("\t".join),
                 st.lists(FIELD, min_size=0, max_size=5).map(" ".join),
                 st.dictionaries(st.sampled_from(["_id", "text", "title", "x"]), FIELD | st.integers(),
                                 max_size=4).map(json.dumps),
                 st.just("x" * 200_000))  # a huge field
CONTENT = st.one_of(st.lists(LINE, max_size=8).map(lambda lines: "\n".join(lines).encode("utf-8")),
                    st.binary(max_size=300),
                    st.lists(LINE, max_size=6).map(lambda lines: "\n".join(lines).encode("utf-8")[:-3]))  # truncated


def _write(directory: Path, name: str, content: bytes, compress: bool) -> Path:
    path = directory / (name + (".gz" if compress else ""))
    path.write_bytes(gzip.compress(content) if compress else content)
    return path


@FUZZ
@given(reader=st.sampled_from(sorted(READERS)), content=CONTENT, compress=st.booleans(), jsonl=st.booleans(),
       lenient=st.booleans())
def test_readers_read_or_name_the_file_and_line(tmp_path, reader, content, compress, jsonl, lenient):
    suffix = ".jsonl" if jsonl and reader in ("collection", "queries") else ".tsv"
    path = _write(tmp_path, f"{reader}{suffix}", content, compress)
    lines = content.count(b"\n") + 1
    try:
        rows = READERS[reader](path, lenient)
    except DataFormatError as error:
        assert not lenient or "gzip" in str(error), f"lenient mode raised {error}"
        assert str(error).startswith(f"{path}:") and error.path == str(path)
        assert error.line is None or 1 <= error.line <= lines
        return
    assert len(rows) <= lines
    if reader in ("queries", "collection") and not lenient:
        assert all(isinstance(k, str) and k.strip() for k in (rows if isinstance(rows, dict) else dict(rows)))


@FUZZ
@given(content=st.binary(min_size=1, max_size=200), lenient=st.booleans())
def test_a_corrupt_gzip_file_is_refused_with_its_name(tmp_path, content, lenient):
    path = tmp_path / "queries.dev.tsv.gz"
    path.write_bytes(b"\x1f\x8b" + content)  # gzip's magic number, then garbage (or a truncated stream)
    with pytest.raises(DataFormatError, match=r"queries\.dev\.tsv\.gz:1: corrupt or truncated gzip stream"):
        read_queries(path, lenient)


KEYS = st.sampled_from(["run.dir", "run.seed", "bm25.k1", "bm25.b", "bm25.method", "bm25.expansion_keep",
                        "pipeline.depth", "pipeline.candidates", "pipeline.fusion", "pipeline.bm25_weight",
                        "serve.port", "serve.max_k", "run", "bm25", "pipeline.nope", "nope.key", "run.dir.deeper",
                        "", ".", "bm25..k1"])
VALUES = st.one_of(st.sampled_from(["1", "-3", "0.5", "1e-4", "true", "null", "[1, 2]", "{a: 1}", "'quoted'", "",
                                    "[unclosed", "{bad", "a: b: c", "!!python/object:os.system", "\t", "ÿ"]),
                   st.text(max_size=20))
SECTIONS = {"run": "irbase.runconfig:RunConfig", "bm25": "irbase.bm25:BM25Config",
            "pipeline": "pipeline.config:ServingConfig", "serve": "pipeline.serve:ServeConfig"}


def _section_class(name: str):
    module, attr = SECTIONS[name].split(":")
    return getattr(__import__(module, fromlist=[attr]), attr)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(section=st.sampled_from(sorted(SECTIONS)), key=KEYS, value=VALUES, separator=st.sampled_from(["=", " ", "=="]))
def test_config_overrides_load_or_name_the_key(section, key, value, separator):
    override = f"{key}{separator}{value}"
    try:
        config = load_section(None, section, _section_class(section), [override])  # no file: fast
    except ConfigError as error:
        message = str(error)
        assert override in message or key.split(".")[-1] in message or f"{section}." in message, message
        return
    except ValueError as error:  # a dataclass's own validation (__post_init__): it names the field
        assert key.split(".")[-1] in str(error) or section in str(error), str(error)
        return
    assert config is not None


@pytest.mark.parametrize("name", ["queries.dev.tsv", "collection.tsv"])
def test_an_empty_file_reads_as_empty(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    assert (read_queries(path) if name.startswith("queries") else list(iter_collection(path))) in ({}, [])
