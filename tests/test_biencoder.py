import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from irbase.artifacts import ArtifactError
from irbase.lm import BaseLMConfig, BaseModelRefused, check_base_model, load_config, resolve

from biencoder.data import TrainBatches
from irbase.examples import NegativesConfig, TrainExamples
from biencoder.encode import EncodeConfig, encode_collection, iter_shards
from biencoder.index import DenseIndex, IndexConfig, recall_against_exact
from biencoder.loss import info_nce, matryoshka_info_nce
from biencoder.model import BiEncoder, BiEncoderConfig, pool

from tests.conftest import PASSAGES, QRELS, QUERIES


def test_info_nce_by_hand_with_false_negative_masked():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    p = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    labels = torch.tensor([0, 1])
    t = 0.5
    s = (q @ p.T / t).tolist()
    expected = (-math.log(math.exp(s[0][0]) / sum(math.exp(x) for x in s[0]))
                - math.log(math.exp(s[1][1]) / sum(math.exp(x) for x in s[1]))) / 2
    assert info_nce(q, p, labels, None, t).item() == pytest.approx(expected, rel=1e-5)
    # passage 2 is also relevant to query 0: it leaves query 0's softmax instead of being pushed away
    mask = torch.tensor([[False, False, True], [False, False, False]])
    masked0 = -math.log(math.exp(s[0][0]) / (math.exp(s[0][0]) + math.exp(s[0][1])))
    masked1 = -math.log(math.exp(s[1][1]) / sum(math.exp(x) for x in s[1]))
    assert info_nce(q, p, labels, mask, t).item() == pytest.approx((masked0 + masked1) / 2, rel=1e-5)


def test_matryoshka_sums_prefix_losses():
    torch.manual_seed(0)
    q, p = torch.randn(3, 8), torch.randn(6, 8)
    labels = torch.arange(3)
    parts = [info_nce(F.normalize(q[:, :d], dim=-1), F.normalize(p[:, :d], dim=-1), labels, None, 0.1)
             for d in (2, 4, 8)]
    assert matryoshka_info_nce(q, p, labels, None, 0.1, [4, 2]).item() == pytest.approx(sum(parts).item(), rel=1e-5)


def test_pooling_by_hand():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pool(hidden, mask, "mean").squeeze(-1).tolist() == [2.0, 4.0]
    assert pool(hidden, mask, "last").squeeze(-1).tolist() == [3.0, 6.0]
    assert pool(hidden, mask, "cls").squeeze(-1).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="pooling 'max'"):
        BiEncoderConfig(pooling="max")


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_save_load_roundtrip(tmp_path, kind, tiny_decoder, tiny_encoder):
    path = tiny_decoder if kind == "decoder" else tiny_encoder
    config = BiEncoderConfig(base_lm=BaseLMConfig(name=str(path), num_layers=2, bidirectional=kind == "decoder"),
                             shared_towers=False, projection_dim=8, matryoshka_dims=[4],
                             pooling="last" if kind == "decoder" else "cls")
    model = BiEncoder.from_base(config, seed=1)
    texts = list(PASSAGES.values())
    before_p, before_q = model.encode(texts, "passage"), model.encode(list(QUERIES.values()), "query")
    assert before_p.shape == (6, 8) and np.allclose(np.linalg.norm(before_p, axis=1), 1, atol=1e-5)
    model.save(tmp_path / "m")
    loaded = BiEncoder.load(tmp_path / "m")
    assert loaded.config == config and loaded.passage_backbone is not None
    assert loaded.query_backbone.config.num_hidden_layers == 2
    np.testing.assert_allclose(loaded.encode(texts, "passage"), before_p, atol=1e-6)
    np.testing.assert_allclose(loaded.encode(list(QUERIES.values()), "query"), before_q, atol=1e-6)
    prefix = loaded.encode(texts, "passage", dim=4)
    assert prefix.shape == (6, 4) and np.allclose(np.linalg.norm(prefix, axis=1), 1, atol=1e-5)


def test_frozen_embeddings_and_separate_towers(tiny_decoder):
    model = BiEncoder.from_base(BiEncoderConfig(base_lm=BaseLMConfig(name=str(tiny_decoder)), shared_towers=False))
    assert not model.query_backbone.get_input_embeddings().weight.requires_grad
    assert model.passage_backbone is not model.query_backbone
    assert any(p.requires_grad for p in model.passage_backbone.parameters())


def test_bidirectional_changes_the_decoder(tiny_decoder):
    text = ["the capital of australia is canberra"]
    causal = BiEncoder.from_base(BiEncoderConfig(base_lm=BaseLMConfig(name=str(tiny_decoder))))
    both = BiEncoder.from_base(BiEncoderConfig(base_lm=BaseLMConfig(name=str(tiny_decoder), bidirectional=True)))
    assert both.query_backbone.config.use_bidirectional_attention
    assert not np.allclose(causal.encode(text, "passage"), both.encode(text, "passage"))


def test_base_model_refusals(tmp_path, tiny_encoder):
    st = tmp_path / "st-model"
    st.mkdir()
    (st / "modules.json").write_text("[]")
    with pytest.raises(BaseModelRefused, match="sentence-embedding checkpoint"):
        check_base_model(str(st))
    for name in ["sentence-transformers/all-MiniLM-L6-v2", "BAAI/bge-small-en-v1.5", "intfloat/e5-base",
                 "cross-encoder/ms-marco-MiniLM-L-6-v2", "google/embeddinggemma-300m"]:
        with pytest.raises(BaseModelRefused):
            resolve(BaseLMConfig(name=name))
    check_base_model(str(st), allow_reference=True)  # explicitly a reference baseline
    for name in ["bert-base-uncased", "google/gemma-3-270m", str(tiny_encoder)]:
        check_base_model(name)
    with pytest.raises(ValueError, match="num_layers=9: the model has 3 layers"):
        load_config(BaseLMConfig(name=str(tiny_encoder), num_layers=9))
    with pytest.raises(ValueError, match="unknown"):
        resolve(BaseLMConfig(name="pypi:unknown"))


def _examples(neg_lists, per_query=2, seed=5):
    qrels = {**QRELS, "q3": {"p4": 2, "p2": 0}}
    return TrainExamples.build(QUERIES, qrels, PASSAGES, neg_lists, NegativesConfig(per_query=per_query, depth=3),
                               seed)


def test_sampling_is_deterministic_and_never_samples_positives():
    mined = {"q1": ["p1", "p2", "p5", "p6"], "q2": ["p3", "p4"]}
    ex = _examples([mined])
    assert ex.negatives["q1"] == ["p2", "p5"]  # positive p1 removed; depth 3 cuts p6
    assert ex.sample("q1", 0, sorted(PASSAGES)) == _examples([mined]).sample("q1", 0, sorted(PASSAGES))
    for epoch in range(20):
        for qid in ex.queries:
            pos, negs = ex.sample(qid, epoch, sorted(PASSAGES))
            assert pos in ex.positives[qid] and not set(negs) & set(ex.positives[qid])
            assert len(set(negs)) == 2


def test_batches_mask_false_negatives_and_shard_over_ranks(tiny_decoder):
    qrels = {"a": {"p1": 1}, "b": {"p1": 1, "p2": 1}}
    ex = TrainExamples.build({"a": "x", "b": "y"}, qrels, PASSAGES, [], NegativesConfig(per_query=1), 0)
    model = BiEncoder.from_base(BiEncoderConfig(base_lm=BaseLMConfig(name=str(tiny_decoder))))
    batches = TrainBatches(ex, 2, model.tokenize)
    batch = batches.collate(["a", "b"], 0)
    pids = [ex.sample("a", 0, batches.all_pids)[0], ex.sample("b", 0, batches.all_pids)[0]]
    mask = batch["false_negatives"]
    assert mask.shape == (2, 4) and batch["labels"].tolist() == [0, 1]
    assert bool(mask[1, 0]) == (pids[0] in {"p1", "p2"})  # a's positive p1 is also b's positive
    assert not mask[0, 0] and not mask[1, 1]
    model(**batch).backward()  # the batch feeds the model's forward as the trainer does
    big = TrainExamples.build({f"q{i}": "t" for i in range(10)}, {f"q{i}": {"p1": 1} for i in range(10)},
                              PASSAGES, [], NegativesConfig(), 0)
    source = TrainBatches(big, 2, model.tokenize)
    assert source.micro_batches_per_epoch(2) == 2
    order = source.order.order(0)
    assert order == source.order.order(0) != source.order.order(1)


def test_encode_resumes_from_finished_shards(tmp_path, tiny_encoder):
    model = BiEncoder.from_base(BiEncoderConfig(base_lm=BaseLMConfig(name=str(tiny_encoder))))
    passages = list(PASSAGES.items())
    config = EncodeConfig(batch_size=2, shard_size=2, dtype="float32", bf16=False)
    inputs = {"collection": "c1", "model": "m1"}
    out = encode_collection(model, passages, tmp_path / "emb", config, inputs)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("emb-*.npy")}
    (out / "emb-00001.npy").unlink()  # as if killed while writing shard 1
    encode_collection(model, passages, out, config, inputs)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("emb-*.npy")}
    assert after["emb-00000.npy"] == first["emb-00000.npy"] and after["emb-00002.npy"] == first["emb-00002.npy"]
    ids, vectors = zip(*iter_shards(out))
    ids = np.concatenate(ids)
    got = dict(zip(ids, np.concatenate(vectors)))
    want = model.encode([t for _, t in passages], "passage")
    for (pid, _), vector in zip(passages, want):
        np.testing.assert_allclose(got[pid], vector, atol=1e-6)
    lengths = [len(PASSAGES[p]) for p in ids]
    assert lengths == sorted(lengths)  # sorted by length to cut padding
    with pytest.raises(ArtifactError, match="another model"):
        encode_collection(model, passages, out, config, {"collection": "c1", "model": "m2"})
    (out / "emb-00002.npy").unlink()
    with pytest.raises(ArtifactError, match="1 of 3 shards missing"):
        list(iter_shards(out))


def _low_rank(n, d=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)) @ rng.standard_normal((8, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("sq8", [False, True])
def test_hnsw_recall_save_load(tmp_path, sq8):
    vectors = _low_rank(3000)
    pids = [f"d{i}" for i in range(3000)]
    queries = _low_rank(50, seed=1)
    hnsw = DenseIndex.from_embeddings(vectors, pids, IndexConfig(m=16, ef_search=64, sq8=sq8))
    exact = DenseIndex.from_embeddings(vectors, pids, IndexConfig(kind="flat"))
    assert recall_against_exact(hnsw, exact, queries, k=10) > 0.9
    scores, ranked = exact.search(queries[:1], 5)
    assert ranked[0][0] == pids[int(np.argmax(vectors @ queries[0]))]
    assert scores[0][0] == pytest.approx(float(np.max(vectors @ queries[0])), abs=1e-5)
    chosen = [pids[i] for i in (7, 2999, 0)]   # score_ids: the stored vectors' inner products, any passage
    np.testing.assert_allclose(hnsw.score_ids(queries[0], chosen), vectors[[7, 2999, 0]] @ queries[0],
                               atol=2e-2 if sq8 else 1e-5)
    with pytest.raises(KeyError, match="not in this index"):
        hnsw.score_ids(queries[0], ["nope"])
    hnsw.save(tmp_path / "idx", {"model": "m1"})
    loaded = DenseIndex.load(tmp_path / "idx", {"model": "m1"})
    np.testing.assert_allclose(loaded.score_ids(queries[0], chosen), hnsw.score_ids(queries[0], chosen), atol=1e-6)
    assert loaded.index.hnsw.efSearch == 64 and isinstance(loaded.pids, np.memmap)
    assert loaded.search(queries, 10)[1] == hnsw.search(queries, 10)[1]
    with pytest.raises(ArtifactError, match="different model"):
        DenseIndex.load(tmp_path / "idx", {"model": "m2"})
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["config"]["dim"] == 64 and manifest["config"]["count"] == 3000


def test_llama_decoder_loads_and_refuses_bidirectional(tmp_path, tiny_decoder):
    from transformers import AutoModel, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0)
    AutoModel.from_config(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    model = BiEncoder.from_base(BiEncoderConfig(base_lm=BaseLMConfig(name=str(tmp_path / "llama")), pooling="last"))
    assert model.encode(["the capital of australia"], "query").shape == (1, 32)
    with pytest.raises(ValueError, match="'llama' has no bidirectional attention option"):
        load_config(BaseLMConfig(name=str(tmp_path / "llama"), bidirectional=True))


def _ir_measures_means(run: dict[str, list[str]], qrels) -> dict[str, float]:
    """recall@1 (hit@1), recall@10/100, MRR@10 and nDCG@10 of `run` by ir-measures, averaged over `qrels`."""
    import ir_measures

    measures = {"recall@1": ir_measures.Success(rel=1) @ 1, "recall@10": ir_measures.R(rel=1) @ 10,
                "recall@100": ir_measures.R(rel=1) @ 100, "mrr@10": ir_measures.RR(rel=1) @ 10,
                "ndcg@10": ir_measures.nDCG @ 10}
    scored = {q: {p: float(len(ranked) - i) for i, p in enumerate(ranked)} for q, ranked in run.items()}
    per_query = {(str(m.measure), m.query_id): m.value
                 for m in ir_measures.iter_calc(list(measures.values()), qrels, scored)}
    return {name: sum(per_query.get((str(m), q), 0.0) for q in qrels) / len(qrels) for name, m in measures.items()}


def test_proxy_evaluation_is_fixed_and_reports_bm25_beside(tmp_path, tiny_msmarco, tiny_encoder):
    """The proxy's corpus, rankings and metrics against ones computed here: the corpus from its definition, the
    dense ranking by exact inner products of embeddings made one text at a time, BM25's from the index's own
    scores of the proxy passages, and every metric by ir-measures."""
    from irbase.bm25 import BM25Config, BM25Index
    from irbase.dataset import Dataset
    from irbase.trec import read_trec_run

    from biencoder.evaluate import ProxyConfig, evaluate_proxy, proxy_corpus

    ds = Dataset.from_dir(tiny_msmarco, "dev")
    bm25 = BM25Index.build(ds.iter_collection(), BM25Config())
    config = ProxyConfig(queries=3, bm25_depth=1, random_passages=1)
    qids, pids = proxy_corpus(ds, bm25, config, seed=0)
    assert (qids, pids) == proxy_corpus(ds, bm25, config, seed=0) and len(qids) == 3 and qids == sorted(qids)
    assert set(qids) <= set(QUERIES)
    # every judged passage of the sampled queries, BM25's top 1 of each, then 1 random passage of the rest
    pool = {p for q in qids for p in ds.qrels[q]} | {hits[0][0] for hits in bm25.search_ids(
        [QUERIES[q] for q in qids], 1)}
    assert pids[:-1] == sorted(pool) and pids[-1] in set(PASSAGES) - pool and len(pids) == len(pool) + 1

    model = BiEncoder.from_base(BiEncoderConfig(base_lm=BaseLMConfig(name=str(tiny_encoder))))
    result = evaluate_proxy(model, ds, bm25, config, seed=0, bf16=False, run_path=tmp_path / "proxy.trec")
    assert result["proxy_passages"] == len(pids) == 5
    qrels = {q: QRELS[q] for q in qids}
    with torch.no_grad():
        passages = {p: model.encode([PASSAGES[p]], "passage", bf16=False)[0] for p in pids}
        dense = {q: sorted(pids, key=lambda p, v=model.encode([QUERIES[q]], "query", bf16=False)[0]:
                           -float(np.dot(v, passages[p]))) for q in qids}
    lexical = {}
    for q in qids:
        scores = dict(zip(pids, map(float, bm25.score_ids(QUERIES[q], pids))))
        lexical[q] = sorted((p for p in pids if scores[p] > 0), key=lambda p: -scores[p])
    # the rankings kept are these
    run = {q: [p for p, _ in hits] for q, hits in read_trec_run(tmp_path / "proxy.trec").items()}
    assert run == dense
    kept = {q: [p for p, _ in hits] for q, hits in read_trec_run(tmp_path / "proxy_bm25.trec").items()}
    assert kept == lexical
    # and the metrics reported are ir-measures' on them
    for prefix, ranking in (("proxy_", dense), ("proxy_bm25_", lexical)):
        for name, value in _ir_measures_means(ranking, qrels).items():
            assert result[prefix + name] == pytest.approx(value, abs=1e-9), prefix + name
    assert result["proxy_bm25_recall@1"] == 1.0  # BM25 finds each tiny query's answer first
    assert result["proxy_recall@1"] != result["proxy_bm25_recall@1"]  # the untrained encoder does not: not BM25's


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_length_chunked_forward_equals_one_padded_pass(kind, pooling, tiny_decoder, tiny_encoder):
    lm = BaseLMConfig(name=str(tiny_decoder), bidirectional=True) if kind == "decoder" \
        else BaseLMConfig(name=str(tiny_encoder))
    texts = list(PASSAGES.values()) + ["short", "a somewhat longer passage about goldfish and their memory " * 3]
    one = BiEncoder.from_base(BiEncoderConfig(base_lm=lm, pooling=pooling, chunk_rows=None))
    chunked = BiEncoder.from_base(BiEncoderConfig(base_lm=lm, pooling=pooling, chunk_rows=2))
    chunked.load_state_dict(one.state_dict())
    batch = one.tokenize(texts, "passage")
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 2  # rows of different lengths, so chunks are cut to different widths
    outs = []
    for model in (one, chunked):
        model.eval()  # no dropout: the two passes must see the same function; autograd works regardless
        model.zero_grad()
        emb = model.embed(batch["input_ids"], batch["attention_mask"], "passage")
        (emb * torch.linspace(-1, 1, emb.shape[-1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outs.append((emb.detach(), grads))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-4)
    assert outs[0][1].keys() == outs[1][1].keys() and outs[0][1]
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
