"""The cross-encoder: pair layout, losses by hand, batches, ONNX export parity (encoder and decoder
kinds), runtime scoring, refusal of an export beyond tolerance, vocabulary shrinking, and training."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from irbase.examples import NegativesConfig, TrainExamples
from irbase.lm import BaseLMConfig
from tests.conftest import PASSAGES, QUERIES, write_train_dev

from crossencoder.data import GroupBatches
from crossencoder.export import ExportConfig, ExportRefused, Tolerance, export_variants, parity, within
from crossencoder.model import CrossEncoder, CrossEncoderConfig, group_loss
from crossencoder.runtime import OnnxReranker
from crossencoder.vocab import VocabShrink, shrink_embeddings

REPO = Path(__file__).resolve().parents[1]
GROUPS = [(q, list(PASSAGES.values())) for q in QUERIES.values()]
ALL_TEXTS = [("passage", t) for t in PASSAGES.values()] + [("query", q) for q in QUERIES.values()]


def _model(lm: Path, **kwargs) -> CrossEncoder:
    model = CrossEncoder.from_base(CrossEncoderConfig(base_lm=BaseLMConfig(name=str(lm), bidirectional=True)
                                                      if "decoder" in str(lm) else BaseLMConfig(name=str(lm)),
                                                      **kwargs))
    torch.manual_seed(1)
    torch.nn.init.normal_(model.head.weight, std=1.0)  # spread the untrained scores so rankings mean something
    return model.eval()


def test_group_losses_by_hand():
    logits = torch.tensor([2.0, 0.0, 1.0, -1.0, 0.5, 0.5])
    listwise = group_loss(logits, 3, "listwise").item()
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(1)))
                - math.log(math.exp(-1) / (math.exp(-1) + 2 * math.exp(0.5)))) / 2
    assert listwise == pytest.approx(expected, rel=1e-6)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    bce = -(math.log(sig(2)) + math.log(1 - sig(0)) + math.log(1 - sig(1))
            + math.log(sig(-1)) + 2 * math.log(1 - sig(0.5))) / 6
    assert group_loss(logits, 3, "bce").item() == pytest.approx(bce, rel=1e-6)


def test_pair_layout_decoder_and_encoder(tiny_decoder, tiny_encoder):
    dec = _model(tiny_decoder, max_length=16, query_max_length=4)
    ids, mask = dec.pairs.encode("what is the capital of australia", [PASSAGES["p1"], "goldfish"])
    fmt = dec.pairs.format
    assert ids.shape[1] == 16 and mask[0].sum() == 16  # truncated to max_length
    assert ids[0, 0] == fmt.prefix[0] and ids[0, 15] == fmt.suffix[0]  # <bos> first, <eos> kept last
    short = int(mask[1].sum())
    assert ids[1, short - 1] == fmt.suffix[0] and (ids[1, short:] == fmt.pad_id).all()
    query = dec.pairs.encode_query("what is the capital of australia")
    assert len(query) == 4 and list(ids[0, 1:5]) == query  # the query is cut at query_max_length
    enc = _model(tiny_encoder)
    ids, mask = enc.pairs.encode("goldfish", ["goldfish grow"])
    tok = enc.pairs.tokenizer
    tokens = [tok.id_to_token(int(i)) for i in ids[0]]
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2 and tokens[-1] == "[SEP]"


def test_groups_put_positive_first_and_never_a_positive_among_negatives(tiny_decoder):
    model = _model(tiny_decoder)
    qrels = {"q1": {"p1": 1, "p2": 1}, "q2": {"p3": 1}}
    examples = TrainExamples.build(QUERIES, qrels, PASSAGES, [{"q1": ["p2", "p3", "p4"], "q2": ["p3", "p1"]}],
                                   NegativesConfig(per_query=3), seed=0)
    batches = GroupBatches(examples, 2, model.pairs)
    batch = next(batches.batches(0, 0, 0, 1))
    assert batch["group_size"] == 4 and batch["input_ids"].shape[0] == 8
    for g, qid in enumerate(batches.order.order(0)[:2]):
        positive, negatives = examples.sample(qid, 0, batches.all_pids)
        assert positive in qrels[qid] and not set(negatives) & set(qrels[qid])
        expected, _ = model.pairs.encode(QUERIES[qid], [PASSAGES[p] for p in [positive] + negatives])
        got = batch["input_ids"][g * 4:(g + 1) * 4].numpy()
        assert (got[:, : expected.shape[1]] == expected).all()
    loss = model(**batch)
    assert loss.ndim == 0 and loss.requires_grad


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_export_parity_runtime_and_save_load(tmp_path, kind, tiny_decoder, tiny_encoder):
    model = _model(tiny_decoder if kind == "decoder" else tiny_encoder)
    model.save(tmp_path / "model")
    loaded = CrossEncoder.load(tmp_path / "model").eval()
    for q, ps in GROUPS:
        assert np.allclose(loaded.score(q, ps), model.score(q, ps), atol=1e-6)
    config = ExportConfig(variants=["fp32", "int8"])
    if kind == "encoder":
        # A random BERT scores every pair of a query within ~0.02 of each other; int8 shifts them all by about
        # as much (measured: max |diff| 0.0205, Spearman 0.986, top-1 agreement 1.0 on this model), mostly
        # together, so the order survives but for a near-tie. The tolerance is 5x that error and lets a few
        # near-ties swap, while an export whose ranking is unrelated to torch's is refused: with the head
        # quantized too, Spearman 0.10 (max |diff| 0.071); scores shuffled within each query, -0.33.
        config.tolerance["int8"] = Tolerance(max_abs=0.1, min_spearman=0.7)
    reports = export_variants(model, tmp_path / "onnx", config, GROUPS)
    assert "refused" not in reports["int8"]
    assert reports["fp32"]["max_abs"] < 1e-4 and reports["fp32"]["spearman"] > 0.999
    if kind == "decoder":  # per-tensor int8 with the head fp32 (per channel: 4.4 / 0.957 on this model)
        assert reports["int8"]["max_abs"] < 1.0 and reports["int8"]["spearman"] > 0.99
    else:
        assert reports["int8"]["max_abs"] < 0.1 and reports["int8"]["spearman"] >= 0.7
        # it is quantized (not a copy of fp32): a tolerance at the fp32 level would refuse it
        assert reports["int8"]["max_abs"] > 100 * reports["fp32"]["max_abs"]
        assert not within(reports["int8"], Tolerance(max_abs=1e-3, min_spearman=0.999))
    runtime = OnnxReranker(tmp_path / "onnx" / "fp32", threads=1, batch_size=2)  # several batches, length-sorted
    assert runtime.provider == "CPUExecutionProvider"
    for q, ps in GROUPS:
        np.testing.assert_allclose(runtime.score(q, ps), model.score(q, ps), atol=1e-4)
    assert runtime.score("anything", []).shape == (0,)
    saved = json.loads((tmp_path / "onnx" / "int8" / "export.json").read_text())
    assert saved["variant"] == "int8" and saved["held_pairs"] == 24


def test_fp16_export_is_checked_and_scores_like_torch(tmp_path, tiny_decoder):
    """The GPU variant, checked here on the CPU provider (no GPU in CI). The random tiny encoder scores every
    pair within ~0.02, so fp16 rounding reorders its near-ties: the decoder's spread makes the check meaningful."""
    model = _model(tiny_decoder)
    report = export_variants(model, tmp_path / "onnx", ExportConfig(variants=["fp16"]), GROUPS)["fp16"]
    assert report["max_abs"] < 0.05 and report["spearman"] > 0.99 and report["top1_agreement"] == 1.0
    runtime = OnnxReranker(tmp_path / "onnx" / "fp16", threads=1)
    assert runtime.variant == "fp16"
    for q, ps in GROUPS:
        np.testing.assert_allclose(runtime.score(q, ps), model.score(q, ps), atol=0.05)


# The production recipe's decoder keeps the down-projections fp32; the encoder checks the opposite setting
@pytest.mark.parametrize("kind, expect_fp32", [("decoder", True), ("encoder", False)])
def test_int8_keeps_the_mlp_down_projections_fp32(tmp_path, kind, expect_fp32, tiny_decoder, tiny_encoder):
    import onnx

    model = _model(tiny_decoder if kind == "decoder" else tiny_encoder)
    loose = {"int8": Tolerance(max_abs=10.0, min_spearman=-1.0)}
    export_variants(model, tmp_path, ExportConfig(variants=["int8"], tolerance=loose,
                                                  int8_ffn_down_fp32=expect_fp32), GROUPS)
    shape = (model.backbone.config.intermediate_size, model.backbone.config.hidden_size)
    kept = json.loads((tmp_path / "int8" / "export.json").read_text())["fp32_nodes"]
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    floats = {t.name: tuple(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    down = sorted(n.name for n in graph.node if n.op_type == "MatMul" and floats.get(n.input[1]) == shape)
    head = [k for k in kept if k not in down]
    assert head and all(k.startswith(head[0]) for k in head)  # the scoring head always stays fp32
    quantized = [n.name for n in graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    assert quantized and not [n for n in quantized if n.startswith(head[0])]
    assert down == (sorted(set(kept) - set(head)) if expect_fp32 else [])
    assert len(down) == (model.backbone.config.num_hidden_layers if expect_fp32 else 0)  # one per layer


def test_export_beyond_tolerance_is_refused_and_not_saved(tmp_path, tiny_decoder):
    model = _model(tiny_decoder)
    strict = ExportConfig(variants=["int8"], tolerance={"int8": Tolerance(max_abs=1e-9, min_spearman=1.0)})
    with pytest.raises(ExportRefused, match="int8 export disagrees"):
        export_variants(model, tmp_path / "onnx", strict, GROUPS)
    assert not (tmp_path / "onnx" / "int8").exists()
    assert not list((tmp_path / "onnx").glob("*")) if (tmp_path / "onnx").exists() else True


def test_a_refused_variant_is_not_saved_while_the_others_are(tmp_path, tiny_decoder):
    model = _model(tiny_decoder)
    stale = tmp_path / "onnx" / "int8"
    stale.mkdir(parents=True)
    (stale / "export.json").write_text("{}")  # an older model's export must not survive a refusal
    config = ExportConfig(variants=["fp32", "int8"])
    config.tolerance["int8"] = Tolerance(max_abs=1e-9, min_spearman=1.0)
    reports = export_variants(model, tmp_path / "onnx", config, GROUPS)
    assert "int8 export disagrees" in reports["int8"]["refused"] and "refused" not in reports["fp32"]
    assert (tmp_path / "onnx" / "fp32" / "export.json").exists() and not stale.exists()
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["fp32"]  # no temporary left behind


def test_runtime_refuses_an_unchecked_export(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="export.json"):
        OnnxReranker(tmp_path)


def test_parity_measures():
    a = [np.array([3.0, 2.0, 1.0]), np.array([0.0, 1.0])]
    report = parity(a, [np.array([3.0, 1.0, 2.5]), np.array([0.0, 1.5])])
    assert report["max_abs"] == pytest.approx(1.5)
    assert report["spearman"] == pytest.approx((0.5 + 1.0) / 2)
    assert report["top1_agreement"] == 1.0
    tolerance = Tolerance(max_abs=1.5, min_spearman=0.75)
    assert within(report, tolerance) and not within(report, Tolerance(max_abs=1.4, min_spearman=0.75))
    # a NaN or an inf anywhere fails, however close the rest is (a NaN fails no `>` test and can drop out of max)
    for bad in (np.nan, np.inf, -np.inf):
        broken = parity(a, [np.array([3.0, 2.0, bad]), np.array([0.0, 1.0])])
        assert broken["non_finite"] == 1 and not within(broken, Tolerance(max_abs=1e9, min_spearman=-1.0))


def test_shrunk_vocabulary_keeps_scores_and_maps_unseen_tokens(tmp_path, tiny_decoder):
    model = _model(tiny_decoder)
    shrink = VocabShrink.from_texts(model.pairs, ALL_TEXTS[1:])  # p1's words that appear nowhere else: dropped
    assert shrink.stats["kept"] < shrink.stats["original"]
    small = shrink_embeddings(model, shrink).eval()
    assert small.backbone.get_input_embeddings().weight.shape[0] == shrink.stats["kept"]
    for q, ps in GROUPS:
        np.testing.assert_allclose(small.score(q, ps[1:]), model.score(q, ps[1:]), atol=1e-5)  # all kept: same
    unseen = model.pairs.tokenizer.token_to_id("Canberra")
    assert shrink.vocab_map[unseen] == -1
    ids = small.pairs.token_ids(["Canberra"])[0]
    assert ids == [int(shrink.vocab_map[small.pairs.format.unk_id])]  # no byte tokens here: unk
    groups = [(q, ps[1:]) for q, ps in GROUPS]
    export_variants(model, tmp_path / "small", ExportConfig(variants=["fp32"]), groups, shrink=shrink)
    import onnx  # the exported graph carries the shrunk table, not the base LM's

    graph = onnx.load(str(tmp_path / "small" / "fp32" / "model.onnx")).graph
    hidden = model.backbone.config.hidden_size
    tables = [tuple(t.dims) for t in graph.initializer if len(t.dims) == 2 and t.dims[1] == hidden
              and t.dims[0] in (shrink.stats["kept"], shrink.stats["original"])]
    assert tables == [(shrink.stats["kept"], hidden)]
    runtime = OnnxReranker(tmp_path / "small" / "fp32", threads=1)
    for q, ps in groups:
        np.testing.assert_allclose(runtime.score(q, ps), model.score(q, ps), atol=1e-4)


def test_training_end_to_end(tmp_path, tiny_decoder):
    data = tmp_path / "data"
    write_train_dev(data, tmp_path / "mined.tsv")
    config = tmp_path / "config.yaml"
    config.write_text(f"""
run: {{dir: {tmp_path / 'run'}, seed: 7}}
data: {{root: {data}}}
bm25: {{expansion: "{{run_dir}}/querygen/filtered/decisions.tsv"}}   # not written yet: the eval reads plain BM25
crossencoder:
  model: {{base_lm: {{name: {tiny_decoder}, num_layers: 2, bidirectional: true}}, max_length: 48}}
  train: {{deepspeed_config: {REPO / 'configs/deepspeed/cpu_fp32.json'}, batch_size: 2, max_steps: 6,
          save_every: 3, log_every: 2, learning_rate: 0.001, threads: 1}}
  negatives: {{files: ["{tmp_path / 'mined.tsv'}"], per_query: 2}}
  eval: {{queries: null, depth: 5}}
""")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "crossencoder.train", "--config", str(config)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    stage = tmp_path / "run" / "crossencoder"
    evaluation = json.loads((stage / "eval.json").read_text())
    assert evaluation["eval_queries"] == 4 and set(evaluation["reranked"]) >= {"recall@1", "mrr@10"}
    assert (tmp_path / "run" / "bm25" / "manifest.json").is_file()  # the plain index, whatever bm25.expansion says
    log = [json.loads(line) for line in (stage / "train_log.jsonl").open()]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert (stage / "checkpoints" / "latest.json").is_file()
    model = CrossEncoder.load(stage / "model")
    assert model.score("goldfish", ["a", "b"]).shape == (2,)
    run = [line.split() for line in (stage / "dev_rerank.trec").read_text().splitlines()]
    assert len({r[0] for r in run}) == 4 and (stage / "dev_rerank_bm25.trec").is_file()
    again = subprocess.run([sys.executable, "-m", "crossencoder.evaluate", "--config", str(config)], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    remeasured = json.loads((stage / "eval-dev_rerank.json").read_text())
    assert remeasured["reranked"] == pytest.approx(evaluation["reranked"])  # the saved model measures the same
    assert remeasured["model"] == str(stage / "model")


def test_init_from_a_fine_tuned_backbone_and_head_learning_rate(tmp_path, tiny_decoder):
    config = CrossEncoderConfig(base_lm=BaseLMConfig(name=str(tiny_decoder), bidirectional=True), head_lr_scale=10.0)
    tuned = CrossEncoder.from_base(config)
    with torch.no_grad():
        for p in tuned.backbone.parameters():
            p.add_(0.5)
    tuned.backbone.save_pretrained(tmp_path / "tower")
    warm = CrossEncoder.from_base(config, init_from=tmp_path / "tower")
    for (name, a), b in zip(warm.backbone.state_dict().items(), tuned.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    fresh = CrossEncoder.from_base(config)
    assert not torch.equal(fresh.backbone.layers[0].mlp.up_proj.weight, warm.backbone.layers[0].mlp.up_proj.weight)
    groups = warm.param_groups(1e-4)
    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(1e-3)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in warm.head.parameters()}
    assert not any(p is warm.backbone.get_input_embeddings().weight for p in groups[0]["params"])  # frozen
    cut = CrossEncoderConfig(base_lm=BaseLMConfig(name=str(tiny_decoder), num_layers=2, bidirectional=True))
    with pytest.raises(ValueError, match="never deeper"):
        CrossEncoder.from_base(cut, init_from=tmp_path / "tower")
    with pytest.raises(FileNotFoundError, match="config.json"):
        CrossEncoder.from_base(config, init_from=tmp_path / "nowhere")


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_a_shallower_tower_fills_the_first_layers_and_the_rest_stay_the_base_lm(kind, tmp_path, tiny_decoder,
                                                                                tiny_encoder):
    base = str(tiny_decoder if kind == "decoder" else tiny_encoder)
    deep = CrossEncoderConfig(base_lm=BaseLMConfig(name=base, bidirectional=True))  # 3 layers
    tower = CrossEncoder.from_base(CrossEncoderConfig(base_lm=BaseLMConfig(name=base, num_layers=2,
                                                                           bidirectional=True)))
    with torch.no_grad():
        for p in tower.backbone.parameters():
            p.add_(0.5)
    tower.backbone.save_pretrained(tmp_path / "tower")
    warm = CrossEncoder.from_base(deep, init_from=tmp_path / "tower").backbone.state_dict()
    fresh = CrossEncoder.from_base(deep).backbone.state_dict()
    tuned = tower.backbone.state_dict()
    last = "layers.2." if kind == "decoder" else "encoder.layer.2."
    from_base = [k for k in warm if last in k]
    assert from_base and all(torch.equal(warm[k], fresh[k]) for k in from_base)
    assert set(tuned) == set(warm) - set(from_base)
    for key, value in tuned.items():
        assert torch.equal(warm[key], value), key
        if value.is_floating_point() and "position_ids" not in key:
            assert not torch.equal(warm[key], fresh[key]), key


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_length_chunked_scores_equal_one_padded_pass(kind, tiny_decoder, tiny_encoder):
    model = _model(tiny_decoder if kind == "decoder" else tiny_encoder, chunk_rows=2)
    passages = list(PASSAGES.values()) + ["short", "goldfish remember things for months " * 5]
    ids, mask = (torch.from_numpy(a) for a in model.pairs.encode("what is the capital of australia", passages))
    assert len(set(mask.sum(1).tolist())) > 2
    with torch.no_grad():
        torch.testing.assert_close(model.chunked_logits(ids, mask), model.logits(ids, mask), atol=1e-5, rtol=1e-4)
        group = torch.arange(4)  # a training group: the loss sees the same logits either way
        loss = model(ids[group], mask[group], group_size=4)
        model.config.chunk_rows = None
        torch.testing.assert_close(model(ids[group], mask[group], group_size=4), loss)
