"""Report statistics against hand-computed cases, the load test, the reranked baseline, config
inheritance and the data slice."""
import threading
import time

import numpy as np
import pytest

from irbase.config import ConfigError, load_yaml
from irbase.dataset import Dataset
from irbase.search import Result
from irbase.slice import SliceConfig, make_slice
from tests.conftest import PASSAGES, QRELS, QUERIES, write_tsv

from benchmarks.load import load_test
from benchmarks.paired import compare_runs, main as paired_main, rank1_overlap
from benchmarks.stats import bootstrap_interval, paired_test, per_query_values, standard_error
from benchmarks.systems import RerankedSearcher
from irbase.fusion import rerank_by_score, rerank_order


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_queries():
    small = bootstrap_interval(np.array([1.0, 0.0] * 10), resamples=2000, seed=1)
    large = bootstrap_interval(np.array([1.0, 0.0] * 500), resamples=2000, seed=1)
    assert small.mean == large.mean == 0.5
    assert small.low < 0.5 < small.high and large.low < 0.5 < large.high
    assert (large.high - large.low) < (small.high - small.low) / 4      # width ~ 1/sqrt(n): 7x narrower
    # normal approximation for a proportion: 1.96 * sqrt(p(1-p)/n) = 0.031 at n = 1000
    assert large.high - large.low == pytest.approx(2 * 0.031, abs=0.01)
    constant = bootstrap_interval(np.ones(30))
    assert (constant.low, constant.high) == (1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_interval(np.array([]))
    # [1, 0, 0, 0]: sd sqrt((1 - 4 x 0.25^2) / 3) = 0.5, so SE 0.5 / sqrt(4) = 0.25
    assert standard_error(np.array([1.0, 0.0, 0.0, 0.0])) == pytest.approx(0.25)
    assert standard_error(np.array([0.7])) == 0.0
    with pytest.raises(ValueError):
        standard_error(np.array([]))


def test_paired_test_cases():
    same = paired_test(np.array([1.0, 0.0, 1.0, 0.0]), np.array([1.0, 0.0, 1.0, 0.0]))
    assert same.difference == 0.0 and same.p_value == 1.0
    better = paired_test(np.ones(40), np.zeros(40), resamples=2000)
    assert better.difference == 1.0 and better.p_value == pytest.approx(1 / 2001)   # only the observed beats it
    # one discordant query in each direction out of many ties: no evidence either way
    tied = paired_test(np.array([1.0, 0.0] + [1.0] * 20), np.array([0.0, 1.0] + [1.0] * 20))
    assert tied.difference == 0.0 and tied.p_value > 0.5
    # 8 wins, 2 losses: exact two-sided sign-flip p = P(|S| >= 6) with 10 fair flips = 112/1024 = 0.109
    wins = paired_test(np.array([1.0] * 8 + [0.0] * 2), np.array([0.0] * 8 + [1.0] * 2), resamples=20000)
    assert wins.p_value == pytest.approx(112 / 1024, abs=0.01)
    with pytest.raises(ValueError):
        paired_test(np.ones(3), np.ones(4))
    with pytest.raises(KeyError, match="same query set"):
        per_query_values({"q1": {"recall@1": 1.0}}, "recall@1", ["q1", "q2"])


class _Sleepy:
    """Counts calls and how many run at once: overlap, not wall time, shows the clients are concurrent."""

    def __init__(self):
        self.calls = self.in_flight = self.most = 0
        self.lock = threading.Lock()

    def search(self, query, k):
        with self.lock:
            self.calls += 1
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        time.sleep(0.05)
        with self.lock:
            self.in_flight -= 1
        return [Result("p", "t", 1.0)] * k


def test_load_test_counts_every_call_and_runs_clients_concurrently():
    one_client, four_clients = _Sleepy(), _Sleepy()
    queries = [(f"q{i}", "text") for i in range(12)]
    qrels = {f"q{i}": {"p": 1} for i in range(9)} | {f"q{i}": {"other": 1} for i in range(9, 12)}
    one = load_test(one_client, queries, 1, qrels=qrels)
    four = load_test(four_clients, queries, 4)
    assert one["recall@1"] == pytest.approx(9 / 12) and "recall@1" not in four  # every answer ranks "p" first
    assert "reranked_mean" not in one  # a searcher without search_detailed: no depth columns
    assert one_client.calls == four_clients.calls == 12 and one["latency_ms"]["n"] == four["latency_ms"]["n"] == 12
    assert one["latency_ms"]["p50"] >= 49.0
    assert one_client.most == 1 and four_clients.most > 1   # sleeping releases the GIL: real overlap
    assert four["queries_per_s"] > one["queries_per_s"]
    with pytest.raises(ValueError):
        load_test(one_client, [("q", "text")], 0)


class _First:
    def search(self, query, k):
        return [Result(f"p{i}", f"text {i}", 10.0 - i) for i in range(min(k, 6))]


class _ByNumber:
    """Scores a passage by its number: reverses the first stage's order."""

    def score(self, query, passages):
        return np.array([float(p.split()[-1]) for p in passages], dtype=np.float32)


def test_reranked_searcher_reorders_the_head_and_keeps_the_tail_below():
    alone = RerankedSearcher(_First(), _ByNumber(), 6, 3, lambda ids, first, sc: rerank_order(ids, sc, 10, None))
    ranked = alone.search("q", 5)
    assert [r.document_id for r in ranked] == ["p2", "p1", "p0", "p3", "p4"]
    assert all(a.score > b.score for a, b in zip(ranked, ranked[1:]))
    # score fusion sees the first stage's scores: 10, 9, 8 + w x z(0, 1, 2) = 10 - 1.22w, 9, 8 + 1.22w
    def fused(w):
        return RerankedSearcher(_First(), _ByNumber(), 6, 3, lambda ids, first, sc: rerank_by_score(ids, first, sc, w))
    assert [r.document_id for r in fused(0.5).search("q", 5)] == ["p0", "p1", "p2", "p3", "p4"]
    assert [r.document_id for r in fused(2.0).search("q", 5)] == ["p2", "p1", "p0", "p3", "p4"]


def test_config_extends_merges_key_by_key_and_refuses_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("a: {x: 1, y: {z: 2, w: 3}}\nb: 5\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\na: {y: {z: 9}}\nc: 1\n")
    assert load_yaml(tmp_path / "child.yaml", ["a.x=4"]) == {"a": {"x": 4, "y": {"z": 9, "w": 3}}, "b": 5, "c": 1}
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_yaml(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml not found"):
        load_yaml(tmp_path / "orphan.yaml")


def test_slice_is_consistent_and_keeps_official_negatives(tmp_path):
    source = tmp_path / "source"
    write_tsv(source / "collection.tsv", PASSAGES.items())
    for split in ("train", "dev"):
        write_tsv(source / f"queries.{split}.tsv", QUERIES.items())
        write_tsv(source / f"qrels.{split}.tsv", [(q, 0, p, r) for q, j in QRELS.items() for p, r in j.items()])
    write_tsv(source / "negatives.train.tsv", [("q4", "p5"), ("q4", "p2"), ("q4", "p1")])
    dest = make_slice(SliceConfig(source=str(source), train_queries=2, dev_queries=1, random_passages=1,
                                  negatives_per_query=2), tmp_path / "slice")
    train, dev = Dataset.from_dir(dest, "train"), Dataset.from_dir(dest, "dev")  # the readers check every id
    assert list(train.queries)[0] == "q4"           # a query with official negatives comes first
    assert len(train.queries) == 2 and len(dev.queries) == 1
    negatives = (dest / "negatives.train.tsv").read_text().split("\n")
    assert negatives[:2] == ["q4\tp5", "q4\tp2"]
    judged = {p for q in train.qrels for p in train.qrels[q]} | {p for q in dev.qrels for p in dev.qrels[q]}
    assert judged | {"p5", "p2"} <= set(train.collection) and len(train.collection) == len(judged | {"p5", "p2"}) + 1
    stamp = (dest / "collection.tsv").stat().st_mtime_ns
    make_slice(SliceConfig(source=str(source), train_queries=2, dev_queries=1, random_passages=1,
                           negatives_per_query=2), dest)
    assert (dest / "collection.tsv").stat().st_mtime_ns == stamp   # same config: left as it is


def test_rerank_benchmark_fuses_like_the_retriever_by_hand():
    from benchmarks.rerank import fuse

    candidates = {"q": ["a", "b", "c", "d"]}
    scores = {("q", "a"): 0.1, ("q", "b"): 0.9, ("q", "c"): 0.5}
    assert fuse(candidates, scores, 3, 1, None) == {"q": ["b", "c", "a", "d"]}  # reranker order, d left below
    # k 1, weight 0.5: a 1/2 + .5/4 = .625, b 1/3 + .5/2 = .583, c 1/4 + .5/3 = .417
    assert fuse(candidates, scores, 3, 1, 0.5) == {"q": ["a", "b", "c", "d"]}
    assert fuse(candidates, {("q", "a"): 0.0, ("q", "b"): 1.0}, 2, 1, None) == {"q": ["b", "a", "c", "d"]}


def test_paired_runs_by_hand(tmp_path, tiny_msmarco, capsys):
    from irbase.trec import write_trec_run

    qrels = {"q1": {"p1": 1}, "q2": {"p2": 1}, "q3": {"p3": 1}, "q4": {"p4": 1}}
    a = {"q1": ["p1", "x"], "q2": ["x", "p2"], "q3": ["x", "y"], "q4": ["p4"]}   # hit@1 on q1, q4
    b = {"q1": ["p1"], "q2": ["p2", "x"], "q3": ["y", "x", "p3"], "q4": ["p4"]}  # hit@1 on q1, q2, q4
    rows = {r["metric"]: r for r in compare_runs(a, b, qrels, ("a", "b"), ["recall@1", "mrr@10"])}
    assert rows["recall@1"]["a"].mean == 0.5 and rows["recall@1"]["b"].mean == 0.75
    assert rows["recall@1"]["diff"].difference == 0.25 and rows["recall@1"]["diff"].queries == 4
    # MRR: a = (1 + 1/2 + 0 + 1) / 4, b = (1 + 1 + 1/3 + 1) / 4
    assert rows["mrr@10"]["a"].mean == pytest.approx(2.5 / 4)
    assert rows["mrr@10"]["diff"].difference == pytest.approx((10 / 3 - 2.5) / 4)
    assert rank1_overlap(a, b, qrels) == {"both": 2, "only_a": 0, "only_b": 1, "neither": 1, "either": 3}
    assert rank1_overlap(b, a, qrels)["only_a"] == 1
    with pytest.raises(ValueError, match="rank different queries .*first: q4"):
        compare_runs(a, {q: r for q, r in b.items() if q != "q4"}, qrels, ("a", "b"))
    with pytest.raises(ValueError, match="no judgements in the split"):
        compare_runs({"zz": ["p1"]}, {"zz": ["p1"]}, qrels, ("a", "b"))
    # the command reads TREC runs and judges them against the split's qrels
    ds = Dataset.from_dir(tiny_msmarco, "dev")
    first = sorted(ds.qrels)[:2]
    for name, hits in (("a", [[], []]), ("b", [[next(iter(ds.qrels[q]))] for q in first])):
        (tmp_path / name).mkdir()
        write_trec_run(tmp_path / name / "dev.trec", {q: [(p, 1.0) for p in h] or [("none", 0.0)]
                                                       for q, h in zip(first, hits)})
    assert paired_main([str(tmp_path / "a" / "dev.trec"), str(tmp_path / "b" / "dev.trec"), "--data",
                        str(tiny_msmarco), "--split", "dev", "--metrics", "recall@1"]) == 0
    out = capsys.readouterr().out
    assert "| recall@1 | 0.000 [0.000, 0.000] | 1.000 [1.000, 1.000] | +1.000" in out and "2 queries" in out
    assert "At rank 1: both 0, only a 0, only b 2, neither 0; either (oracle) 2/2" in out
