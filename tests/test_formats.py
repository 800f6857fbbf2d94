import gzip
import json
import logging

import pytest

from irbase import formats
from irbase.negatives import read_negatives
from irbase.dataset import Dataset
from irbase.formats import DataFormatError

from tests.conftest import PASSAGES, QRELS, QUERIES, write_tsv


def test_collection_plain_and_gzip_agree(tmp_path):
    plain = write_tsv(tmp_path / "collection.tsv", PASSAGES.items())
    gz = tmp_path / "collection.tsv.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    assert formats.read_collection(plain) == PASSAGES
    assert formats.read_collection(gz) == PASSAGES


def test_collection_is_lazy(tmp_path):
    path = write_tsv(tmp_path / "c.tsv", [("a", "x"), ("b", "y"), ("b", "dup")])
    rows = formats.iter_collection(path)
    assert next(rows) == ("a", "x")  # streams: the duplicate further down is not read yet
    assert next(rows) == ("b", "y")
    with pytest.raises(DataFormatError, match=r"c\.tsv:3: duplicate pid 'b' \(first at line 2\)"):
        next(rows)


def test_wrong_column_count_names_file_and_line(tmp_path):
    path = tmp_path / "collection.tsv"
    path.write_text("1\tfine\n2\ttoo\tmany\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as err:
        formats.read_collection(path)
    assert err.value.path == str(path) and err.value.line == 2
    assert "expected 2 tab-separated columns (pid, text), found 3" in str(err.value)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "queries.dev.tsv"
    path.write_bytes(b"1\tok\n2\tbad \xff\xfe byte\n")
    with pytest.raises(DataFormatError, match=r"queries\.dev\.tsv:2: invalid UTF-8 at byte 6"):
        formats.read_queries(path)


def test_duplicate_query_id(tmp_path):
    path = write_tsv(tmp_path / "q.tsv", [("1", "a"), ("1", "b")])
    with pytest.raises(DataFormatError, match=r"q\.tsv:2: duplicate qid '1'"):
        formats.read_queries(path)


def test_lenient_skips_counts_and_reports(tmp_path, caplog):
    path = tmp_path / "c.tsv"
    path.write_bytes(b"1\tgood\n2\tbad\tcols\n3\t\xffbad utf8\n1\tdup\n4\talso good\n")
    with caplog.at_level(logging.WARNING):
        assert formats.read_collection(path, lenient=True) == {"1": "good", "4": "also good"}
    assert "skipped 3 malformed line(s)" in caplog.text and "line 2" in caplog.text


def test_qrels_tab_space_and_beir_header(tmp_path):
    tab = write_tsv(tmp_path / "a.tsv", [("q1", 0, "p1", 1), ("q1", 0, "p2", 0)])
    space = tmp_path / "b.txt"
    space.write_text("q1 0 p1 1\nq1 Q0 p2 0\n", encoding="utf-8")
    beir = write_tsv(tmp_path / "qrels" / "dev.tsv", [("query-id", "corpus-id", "score"), ("q1", "p1", 1),
                                                      ("q1", "p2", 0)])
    expected = {"q1": {"p1": 1, "p2": 0}}
    assert formats.read_qrels(tab) == formats.read_qrels(space) == formats.read_qrels(beir) == expected


@pytest.mark.parametrize("line, message", [
    ("q1 0 p1", "relevance 'p1' is not an integer"),
    ("q1 0 p1 1 extra", "expected 4 columns"),
    ("q1 0 p1 high", "relevance 'high' is not an integer"),
])
def test_qrels_errors(tmp_path, line, message):
    path = tmp_path / "qrels.tsv"
    path.write_text(f"q0 0 p0 1\n{line}\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"qrels\.tsv:2: {message}"):
        formats.read_qrels(path)


def test_qrels_duplicate_judgement(tmp_path):
    path = write_tsv(tmp_path / "qrels.tsv", [("q", 0, "p", 1), ("q", 0, "p", 2)])
    with pytest.raises(DataFormatError, match="qrels.tsv:2: duplicate judgement"):
        formats.read_qrels(path)


def test_beir_corpus_and_queries(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "d1", "title": "Canberra", "text": "is the capital."}) + "\n"
                      + json.dumps({"_id": "d2", "title": "", "text": "no title"}) + "\n", encoding="utf-8")
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"_id": "1", "text": "capital?"}) + "\n", encoding="utf-8")
    assert formats.read_collection(corpus) == {"d1": "Canberra is the capital.", "d2": "no title"}
    assert formats.read_queries(queries) == {"1": "capital?"}


def test_beir_bad_json_and_missing_key(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": \n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:2: invalid JSON"):
        formats.read_collection(corpus)
    corpus.write_text('{"_id": "d1", "body": "ok"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl:1: missing key\(s\) text"):
        formats.read_collection(corpus)


def test_triples_top1000_negatives(tmp_path):
    triples = write_tsv(tmp_path / "triples.train.small.tsv", [("q", "pos", "neg")])
    assert list(formats.iter_triples(triples)) == [("q", "pos", "neg")]
    top = write_tsv(tmp_path / "top1000.dev", [("1", "7", "q", "passage")])
    row = next(formats.iter_top1000(top))
    assert (row.qid, row.pid, row.query, row.passage) == ("1", "7", "q", "passage")
    neg = write_tsv(tmp_path / "neg.tsv", [("1", "7"), ("1", "8", "2", "3.5"), ("2", "9")])
    assert read_negatives(neg) == {"1": ["7", "8"], "2": ["9"]}
    bad = write_tsv(tmp_path / "bad.tsv", [("q", "pos")])
    with pytest.raises(DataFormatError, match=r"bad\.tsv:1: expected 3 tab-separated columns"):
        list(formats.iter_triples(bad))


def test_dataset_msmarco_layout(tiny_msmarco):
    ds = Dataset.from_dir(tiny_msmarco, "dev")
    assert ds.collection == PASSAGES and ds.qrels == QRELS and ds.queries == QUERIES


def test_dataset_beir_layout_and_overrides(tmp_path, tiny_msmarco):
    root = tmp_path / "beir"
    root.mkdir()
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": p, "title": "", "text": t}) + "\n"
                                               for p, t in PASSAGES.items()), encoding="utf-8")
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                                                for q, t in QUERIES.items()), encoding="utf-8")
    write_tsv(root / "qrels" / "test.tsv", [("query-id", "corpus-id", "score"), ("q1", "p1", 1)])
    ds = Dataset.from_dir(root, "test")
    assert ds.queries == {"q1": QUERIES["q1"]} and ds.qrels == {"q1": {"p1": 1}}
    # A held-out set in the same layout, swapped in file by file:
    other = write_tsv(tmp_path / "held.tsv", [("q2", 0, "p3", 1)])
    ds = Dataset.from_dir(tiny_msmarco, "dev", qrels=other)
    assert ds.queries == {"q2": QUERIES["q2"]}


def test_dataset_missing_files_are_named(tmp_path, tiny_msmarco):
    with pytest.raises(FileNotFoundError, match="data directory .*nowhere not found"):
        Dataset.from_dir(tmp_path / "nowhere", "dev")
    with pytest.raises(FileNotFoundError, match=r"no queries file for split 'test'.*queries\.test\.tsv"):
        Dataset.from_dir(tiny_msmarco, "test")
    with pytest.raises(FileNotFoundError, match="--qrels .*missing.tsv: file not found"):
        Dataset.from_dir(tiny_msmarco, "dev", qrels=tmp_path / "missing.tsv")


def test_qrels_naming_unknown_passage_or_query(tiny_msmarco, caplog):
    write_tsv(tiny_msmarco / "qrels.dev.tsv", [("q1", 0, "p1", 1), ("q2", 0, "p404", 1), ("q9", 0, "p1", 1)])
    with pytest.raises(DataFormatError, match=r"qrels\.dev\.tsv: query 'q2' judges passage 'p404', which is not in"):
        Dataset.from_dir(tiny_msmarco, "dev").qrels
    ds = Dataset.from_dir(tiny_msmarco, "dev", lenient=True)
    with caplog.at_level(logging.WARNING):
        assert ds.qrels == {"q1": {"p1": 1}}
    assert ds.skipped["qrels"] == 2 and "skipped 2" in caplog.text
