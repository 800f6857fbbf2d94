import math
import random

import pytest

from irbase.metrics import evaluate, ndcg


def test_hand_computed_case():
    qrels = {
        "a": {"p1": 1},              # found at rank 2
        "b": {"p2": 1, "p3": 1},     # first result relevant; one of two relevant in top 10
        "c": {"p4": 1},              # never found
        "d": {"p5": 0},              # no relevant passage: left out
    }
    run = {"a": ["x", "p1", "y"], "b": ["p2", "x"], "c": ["x", "y"], "d": ["p5"]}
    ev = evaluate(run, qrels, recall_ks=(1, 2, 100))
    assert ev.num_queries == 3 and ev.no_relevant == 1
    assert ev.per_query["a"] == pytest.approx({"recall@1": 0, "recall@2": 1, "recall@100": 1, "mrr@10": 0.5,
                                               "ndcg@10": 1 / math.log2(3)})
    assert ev.per_query["b"]["recall@1"] == 1.0          # hit@1, not 1/|relevant|
    assert ev.per_query["b"]["recall@2"] == 0.5
    idcg_b = 1 + 1 / math.log2(3)
    assert ev.per_query["b"]["ndcg@10"] == pytest.approx(1 / idcg_b)
    assert ev.means["recall@1"] == pytest.approx(1 / 3)
    assert ev.means["mrr@10"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert ev.means["recall@100"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert any("left out" in n for n in ev.notes)


def test_graded_ndcg_by_hand():
    grades = {"a": 3, "b": 2, "c": 1, "d": 0}
    # ranking c, a, z: dcg = 1/log2(2) + 3/log2(3); ideal 3, 2, 1
    dcg = 1 + 3 / math.log2(3)
    idcg = 3 + 2 / math.log2(3) + 1 / 2
    assert ndcg(["c", "a", "z"], grades, 10) == pytest.approx(dcg / idcg)


def test_mrr_cutoff_duplicates_and_missing():
    qrels = {"a": {"p": 1}, "b": {"p": 1}}
    run = {"a": [f"x{i}" for i in range(10)] + ["p"]}    # relevant at rank 11: outside MRR@10
    ev = evaluate(run, qrels)
    assert ev.per_query["a"]["mrr@10"] == 0 and ev.per_query["a"]["recall@100"] == 1
    assert ev.missing_from_run == 1 and ev.per_query["b"]["recall@100"] == 0
    assert evaluate({"a": ["x", "x", "p"]}, {"a": {"p": 1}}).per_query["a"]["mrr@10"] == 0.5


def test_min_relevance_for_trec_dl():
    qrels = {"q": {"weak": 1, "strong": 2}}
    run = {"q": ["weak", "strong"]}
    assert evaluate(run, qrels).per_query["q"]["recall@1"] == 1
    assert evaluate(run, qrels, min_relevance=2).per_query["q"]["recall@1"] == 0
    assert evaluate(run, qrels, min_relevance=2).per_query["q"]["mrr@10"] == 0.5


def _random_case(seed: int):
    rng = random.Random(seed)
    pids = [f"p{i}" for i in range(300)]
    qrels, run = {}, {}
    for q in range(60):
        judged = rng.sample(pids, rng.randint(1, 6))
        qrels[f"q{q}"] = {p: rng.choice([0, 1, 1, 2, 3]) for p in judged}
        ranked = rng.sample(pids, 120)
        for p in judged:  # put judged passages at random depths so every metric is exercised
            if rng.random() < 0.6:
                ranked.insert(rng.randint(0, 30), p)
        seen = set()
        run[f"q{q}"] = [p for p in ranked if not (p in seen or seen.add(p))]
    return qrels, run


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("min_rel", [1, 2])
def test_matches_ir_measures(seed, min_rel):
    ir_measures = pytest.importorskip("ir_measures")
    qrels, run = _random_case(seed)
    ours = evaluate(run, qrels, min_relevance=min_rel, recall_ks=(1, 10, 100))
    scored = {q: {p: float(len(r) - i) for i, p in enumerate(r)} for q, r in run.items()}
    # ir-measures only averages queries with relevant passages when asked per query; use iter_calc.
    keep = {q for q in qrels if any(g >= min_rel for g in qrels[q].values())}
    measures = {
        "recall@1": ir_measures.Success(rel=min_rel) @ 1,
        "recall@10": ir_measures.R(rel=min_rel) @ 10,
        "recall@100": ir_measures.R(rel=min_rel) @ 100,
        "mrr@10": ir_measures.RR(rel=min_rel) @ 10,
        "ndcg@10": ir_measures.nDCG @ 10,
    }
    theirs: dict[str, dict[str, float]] = {}
    for m in ir_measures.iter_calc(list(measures.values()), qrels, scored):
        if m.query_id in keep:
            theirs.setdefault(str(m.measure), {})[m.query_id] = m.value
    assert ours.num_queries == len(keep)
    for name, measure in measures.items():
        for qid in keep:
            assert ours.per_query[qid][name] == pytest.approx(theirs[str(measure)][qid], abs=1e-9), (name, qid)
