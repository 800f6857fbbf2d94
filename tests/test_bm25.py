import numpy as np
import pytest

from irbase.artifacts import ArtifactError
from irbase.bm25 import BM25Config, BM25Index, build_or_load, mine_negatives
from irbase.dataset import Dataset
from irbase.negatives import read_negatives
from irbase.search import Result

from tests.conftest import PASSAGES, QUERIES, write_tsv


def test_search_ranks_the_obvious_passage_first():
    index = BM25Index.build(PASSAGES.items(), BM25Config())
    top = index.search(QUERIES["q1"], 3)
    assert isinstance(top[0], Result) and top[0].document_id == "p1"
    assert top[0].document_text == PASSAGES["p1"]
    assert [r.score for r in top] == sorted((r.score for r in top), reverse=True)
    # stemming: "grows" matches "grow"
    assert index.search("grows goldfish", 1)[0].document_id == "p3"
    assert index.search("zzzz qqqq", 5) == []  # no term matches: nothing is retrieved
    assert len(index.search("australia", 100)) == 2  # k beyond the corpus is clipped


def test_score_ids_gives_the_search_scores_and_zero_without_a_match(tmp_path, tiny_msmarco):
    ds = Dataset.from_dir(tiny_msmarco, "dev")
    for index in (BM25Index.build(PASSAGES.items(), BM25Config()), build_or_load(tmp_path / "bm25", ds, BM25Config())):
        hits = index.search_ids([QUERIES["q1"]], 100)[0]
        unmatched = sorted(set(PASSAGES) - {p for p, _ in hits})
        scores = index.score_ids(QUERIES["q1"], [p for p, _ in hits] + unmatched)
        np.testing.assert_allclose(scores[:len(hits)], [s for _, s in hits], rtol=1e-6)
        assert hits and unmatched and not scores[len(hits):].any()
        assert not index.score_ids("zzzz qqqq", ["p1"]).any() and index.score_ids(QUERIES["q1"], []).shape == (0,)
        with pytest.raises(KeyError, match="not in this BM25 index"):
            index.score_ids(QUERIES["q1"], ["nope"])


@pytest.mark.parametrize("query, k, error", [("", 3, ValueError), ("  ", 3, ValueError), (None, 3, TypeError),
                                             ("q", 0, ValueError), ("q", 1.5, TypeError)])
def test_bad_input(query, k, error):
    index = BM25Index.build(PASSAGES.items(), BM25Config())
    with pytest.raises(error):
        index.search(query, k)


def test_save_load_roundtrip_memory_mapped(tmp_path, tiny_msmarco):
    ds = Dataset.from_dir(tiny_msmarco, "dev")
    built = BM25Index.build(ds.iter_collection(), BM25Config())
    loaded = build_or_load(tmp_path / "bm25", ds, BM25Config())
    assert isinstance(loaded.pids, np.memmap)
    assert isinstance(loaded.retriever.scores["data"], np.memmap)
    for query in QUERIES.values():
        assert loaded.search(query, 4) == built.search(query, 4)


def test_index_from_other_collection_is_refused(tmp_path, tiny_msmarco):
    ds = Dataset.from_dir(tiny_msmarco, "dev")
    build_or_load(tmp_path / "bm25", ds, BM25Config())
    write_tsv(tiny_msmarco / "collection.tsv", list(PASSAGES.items())[:-1] + [("p6", "changed text")])
    with pytest.raises(ArtifactError, match="different collection"):
        build_or_load(tmp_path / "bm25", Dataset.from_dir(tiny_msmarco, "dev"), BM25Config())


def test_config_change_rebuilds(tmp_path, tiny_msmarco):
    ds = Dataset.from_dir(tiny_msmarco, "dev")
    build_or_load(tmp_path / "bm25", ds, BM25Config())
    assert build_or_load(tmp_path / "bm25", ds, BM25Config(k1=0.9, b=0.4)).config.k1 == 0.9


def test_mined_negatives_exclude_positives(tmp_path, tiny_msmarco):
    ds = Dataset.from_dir(tiny_msmarco, "dev")
    index = BM25Index.build(ds.iter_collection(), BM25Config())
    out = tmp_path / "neg.tsv"
    qrels = {"q1": {"p1": 1}, "q3": {"p4": 1}}
    rows = mine_negatives(index, ds.all_queries, qrels, depth=3, out=out)
    lines = [line.split("\t") for line in out.read_text().splitlines()]
    assert rows == len(lines) > 0
    assert all(len(parts) == 4 for parts in lines)
    negatives = read_negatives(out)
    assert "p1" not in negatives["q1"] and "p2" in negatives["q1"]  # Sydney/Australia is the hard negative
    assert "p4" not in negatives.get("q3", [])
    assert [int(p[2]) for p in lines if p[0] == "q1"] == list(range(1, len(negatives["q1"]) + 1))


def test_expanded_index_matches_appended_queries_and_returns_the_passage_text(tmp_path, tiny_msmarco):
    decisions = write_tsv(tmp_path / "decisions.tsv", [
        ("g1", "p3", 0, "round-trip", "pet fish aquarium lifespan"),   # words p3 lacks
        ("g2", "p5", 1, "kept", "nuclear weapons history"),
        ("g3", "p1", 0, "repeated-word", "zebra zebra zebra")])          # a dropped decision: not appended
    plain = BM25Index.build(PASSAGES.items(), BM25Config())
    assert plain.search("aquarium lifespan", 3) == []
    ds = Dataset.from_dir(tiny_msmarco, "dev")
    config = BM25Config(expansion=str(decisions))
    expanded = build_or_load(tmp_path / "bm25-expanded", ds, config)
    top = expanded.search("aquarium lifespan", 3)
    assert [r.document_id for r in top] == ["p3"] and top[0].document_text == PASSAGES["p3"]
    assert expanded.search("nuclear weapons", 1)[0].document_text == PASSAGES["p5"]
    assert expanded.search("zebra", 3) == []
    # another expansion file rebuilds the index (the collection is the same)
    write_tsv(decisions, [("g1", "p2", 1, "kept", "zebra crossing")])
    rebuilt = build_or_load(tmp_path / "bm25-expanded", ds, config)
    assert [r.document_id for r in rebuilt.search("zebra", 3)] == ["p2"] and rebuilt.search("aquarium", 3) == []
    write_tsv(decisions, [("g1", "p2", 1, "kept")])
    with pytest.raises(Exception, match="decisions.tsv:1: expected 5 tab-separated columns"):
        build_or_load(tmp_path / "bm25-expanded", ds, config)
    with pytest.raises(FileNotFoundError, match=r"bm25.expansion: .*absent.tsv not found .*querygen.filter"):
        build_or_load(tmp_path / "bm25-expanded", ds, BM25Config(expansion=str(tmp_path / "absent.tsv")))


def test_configured_plain_drops_the_expansion_and_its_index_dir(tmp_path):
    """Training evaluations ask for the plain index: their candidates must not wait for, or move with, the
    generated queries that the served index is expanded with."""
    from irbase.bm25 import configured
    config = tmp_path / "c.yaml"
    config.write_text(f'run: {{dir: {tmp_path / "run"}}}\ndata: {{root: {tmp_path}}}\n'
                      'bm25: {expansion: "{run_dir}/querygen/filtered/decisions.tsv"}\n')
    served, served_dir = configured(str(config), [])
    plain, plain_dir = configured(str(config), [], plain=True)
    assert served.expansion == str(tmp_path / "run" / "querygen/filtered/decisions.tsv")
    assert served_dir == tmp_path / "run" / "bm25-expanded"
    assert plain.expansion is None and plain_dir == tmp_path / "run" / "bm25"
    assert (plain.k1, plain.b) == (served.k1, served.b)
