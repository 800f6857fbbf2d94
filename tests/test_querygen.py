"""The query generator on a tiny random decoder: loss on the query tokens only, save/load, cached
sampling against a full forward, seeded and resumable generation, and the filter's decisions."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from irbase.lm import BaseLMConfig, load_tokenizer
from querygen.data import PromptEncoder, collate, split_holdout, vocab_ids, vocab_map
from querygen.filter import FilterConfig, decide, degenerate, hit_rates
from querygen.model import GeneratorConfig, QueryGenerator
from querygen.sampling import SamplingConfig, sample, stop_tokens
from tests.conftest import PASSAGES, QUERIES, write_train_dev

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def generator(tiny_decoder):
    config = GeneratorConfig(base_lm=BaseLMConfig(name=str(tiny_decoder)), train_layers=1,
                             passage_max_tokens=16, query_max_tokens=6)
    tokenizer = load_tokenizer(str(tiny_decoder))
    encoder = PromptEncoder(tokenizer, config.prompt, config.passage_max_tokens, config.query_max_tokens)
    vocab = vocab_ids(tokenizer, list(PASSAGES.values()) + list(QUERIES.values()), encoder)
    return QueryGenerator.from_base(config, vocab), encoder


def test_targets_cover_the_query_tokens_and_eos_only(generator):
    model, encoder = generator
    prompts = encoder.prompts([PASSAGES["p1"], PASSAGES["p3"]])
    targets = encoder.targets([QUERIES["q1"], QUERIES["q2"]])
    mapping = vocab_map(model.vocab.tolist(), len(model.tokenizer))
    batch = collate(prompts, targets, mapping, pad_id=0)
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        where = (batch["targets"][row] != -100).nonzero().squeeze(1).tolist()
        # position t predicts token t + 1: from the prompt's last token to the one before EOS
        assert where == list(range(len(prompt) - 1, len(prompt) + len(target) - 1))
        assert model.vocab[batch["targets"][row][where]].tolist() == target
        assert target[-1] == model.tokenizer.eos_token_id
    # the loss is the mean cross-entropy of exactly those positions over the sliced head
    hidden = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = hidden @ model.head.weight.T
    mask = batch["targets"] != -100
    expected = torch.nn.functional.cross_entropy(logits[mask], batch["targets"][mask])
    assert abs(model(**batch).item() - expected.item()) < 1e-5


def test_only_the_top_layers_norm_and_head_train(generator):
    model, _ = generator
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    last = len(model.backbone.layers) - 1
    assert trainable and all(n.startswith((f"backbone.layers.{last}.", "backbone.norm.", "head.")) for n in trainable)
    assert "head.weight" in trainable and "backbone.embed_tokens.weight" not in trainable
    # the head starts as the tied embedding rows of the kept tokens
    assert torch.equal(model.head.weight, model.backbone.embed_tokens.weight[model.vocab])


def test_save_and_load_score_the_same(generator, tmp_path):
    model, encoder = generator
    mapping = vocab_map(model.vocab.tolist(), len(model.tokenizer))
    batch = collate(encoder.prompts([PASSAGES["p4"]]), encoder.targets([QUERIES["q3"]]), mapping, pad_id=0)
    with torch.no_grad():
        model.head.weight.add_(0.01)  # saved weights, not a fresh slice of the embeddings
    model.save(tmp_path / "gen")
    loaded = QueryGenerator.load(tmp_path / "gen")
    assert torch.equal(loaded.vocab, model.vocab)
    assert loaded.token_nll(batch) == pytest.approx(model.token_nll(batch), abs=1e-5)
    with pytest.raises(FileNotFoundError, match="not a saved query generator"):
        QueryGenerator.load(tmp_path)


def test_cached_greedy_decoding_equals_a_full_forward_each_step(generator):
    model, encoder = generator
    prompts = encoder.prompts([PASSAGES["p1"], PASSAGES["p5"]])  # different lengths: left padding is exercised
    assert len(prompts[0]) != len(prompts[1])
    config = SamplingConfig(per_passage=2, temperature=0, max_new_tokens=5)
    never = torch.zeros(len(model.vocab), dtype=torch.bool)
    tokens, decoded = sample(model, prompts, config, None, never)
    assert decoded == 4 * 5
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(5):
            hidden = model.backbone(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]
            seq.append(int(model.vocab[model.logits(hidden).argmax()]))
        assert tokens[2 * row] == tokens[2 * row + 1] == seq[len(prompt):]


def test_sampling_is_seeded_and_stops_at_eos(generator):
    model, encoder = generator
    prompts = encoder.prompts(list(PASSAGES.values())[:3])
    config = SamplingConfig(per_passage=3, top_k=20, max_new_tokens=6)
    stop = stop_tokens(model)
    assert stop[(model.vocab == model.tokenizer.eos_token_id).nonzero()].all()
    first = sample(model, prompts, config, torch.Generator().manual_seed(5), stop)[0]
    again = sample(model, prompts, config, torch.Generator().manual_seed(5), stop)[0]
    other = sample(model, prompts, config, torch.Generator().manual_seed(6), stop)[0]
    assert first == again and first != other
    assert all(model.tokenizer.eos_token_id not in row and len(row) <= 6 for row in first)
    # everything a stop token: every query ends at once, empty
    assert sample(model, prompts, config, torch.Generator().manual_seed(5), torch.ones_like(stop))[0] == [[]] * 9


def test_degenerate_and_duplicate_queries_are_dropped():
    config = FilterConfig(min_words=2, max_words=6, max_word_repeats=2, keep_rank=5)
    assert degenerate("which which is located", config) == "repeated-word"
    assert degenerate("located where located in located", config) == "repeated-word"
    assert degenerate("cost of a stamp cost of", config) == "repeated-phrase"
    assert degenerate("stamps", config) == "too-short"
    assert degenerate("one two three four five six seven", config) == "too-long"
    assert degenerate("cost for first class stamp", config) is None
    queries = {"a": "Cost of stamps?", "b": "cost of stamps", "c": "stamp prices uk", "d": "stamp price",
               "e": "x"}
    sources = {"a": "p1", "b": "p1", "c": "p1", "d": "p2", "e": "p2"}
    ranks = {"a": 1, "b": 1, "c": 9, "d": 0, "e": 1}
    assert decide(queries, sources, ranks, config) == {"a": "kept", "b": "duplicate", "c": "round-trip",
                                                       "d": "round-trip", "e": "too-short"}
    assert decide(queries, sources, ranks, FilterConfig(keep_rank=None))["c"] == "kept"
    assert hit_rates({"a": 1, "b": 3, "c": 0, "d": 7}, (1, 5)) == {"hit@1": 0.25, "hit@5": 0.5}


def test_holdout_is_fixed_and_disjoint():
    qrels = {f"q{i}": {f"p{i}": 1} for i in range(40)}
    queries = {q: "text" for q in qrels}
    passages = {f"p{i}": "text" for i in range(40) if i != 3}  # q3's positive is not in the collection
    from querygen.data import HoldoutConfig
    train, held = split_holdout(qrels, queries, passages, HoldoutConfig(queries=10, seed=1))
    assert len(held) == 10 and not set(train) & set(held) and "q3" not in train | held.keys()
    assert len(train) + len(held) == 39
    assert split_holdout(qrels, queries, passages, HoldoutConfig(queries=10, seed=1))[1] == held


def _config(tmp_path: Path, lm: Path) -> Path:
    data = tmp_path / "data"
    write_train_dev(data, tmp_path / "mined.tsv")
    config = tmp_path / "config.yaml"
    config.write_text(f"""
run: {{dir: {tmp_path / 'run'}, seed: 7}}
data: {{root: {data}}}
querygen:
  model: {{base_lm: {{name: {lm}}}, train_layers: 1, passage_max_tokens: 16, query_max_tokens: 6}}
  train: {{deepspeed_config: {REPO / 'configs/deepspeed/cpu_fp32.json'}, batch_size: 1, max_steps: 3,
          save_every: 2, log_every: 1, learning_rate: 0.001, threads: 1}}
  holdout: {{queries: 1, seed: 3}}
  eval_pairs: 1
  generate: {{sampling: {{per_passage: 2, top_k: 20, max_new_tokens: 6}}, batch_size: 2, shard_size: 2,
             int8: true, threads: 1}}
  filter: {{min_words: 1, keep_rank: 3}}
""")
    return config


def _run(module: str, config: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", module, "--config", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_train_generate_resume_and_filter_end_to_end(tmp_path, tiny_decoder):
    config = _config(tmp_path, tiny_decoder)
    assert "held-out query NLL/token" in _run("querygen.train", config)
    run = tmp_path / "run" / "querygen"
    assert (run / "holdout.tsv").read_text().count("\n") == 1
    import json
    assert "int8: held-out query NLL/token" in _run("querygen.evaluate", config)
    precision = json.loads((run / "precision.json").read_text())
    trained = json.loads((run / "eval.json").read_text())["heldout_nll_after"]
    assert precision["fp32"]["nll_per_token"] == pytest.approx(trained, rel=1e-4)  # the saved model is the trained one
    assert precision["int8_minus_fp32"] == pytest.approx(precision["int8"]["nll_per_token"] - trained, rel=1e-3)
    _run("querygen.generate", config)
    out = run / "generated"
    shards = sorted((out / "shards").glob("shard-*.tsv"))
    assert len(shards) == 3  # 6 passages, 2 per shard
    lines = [line.split("\t") for s in shards for line in s.read_text().splitlines()]
    assert [(pid, j) for pid, j, _ in lines] == [(p, str(j)) for p in PASSAGES for j in range(2)]
    queries = (out / "queries.generated.tsv").read_text()
    before = {s.name: s.read_text() for s in shards}
    shards[1].unlink()  # a lost shard is written again, identically; the others are not rewritten
    mtime = shards[0].stat().st_mtime_ns
    _run("querygen.generate", config)
    assert {s.name: s.read_text() for s in shards} == before and shards[0].stat().st_mtime_ns == mtime
    assert (out / "queries.generated.tsv").read_text() == queries
    qrels = (out / "qrels.generated.tsv").read_text().splitlines()
    assert all(line.split("\t")[2] == line.split("\t")[0].split("-")[1] for line in qrels)

    # another sampling config must not mix with these shards
    (config.parent / "other.yaml").write_text(config.read_text().replace("top_k: 20", "top_k: 5"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    refused = subprocess.run([sys.executable, "-m", "querygen.generate", "--config", str(config.parent / "other.yaml")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "generated with another generator" in refused.stderr

    printed = _run("querygen.filter", config)
    assert "kept" in printed
    summary = json.loads((run / "filtered" / "filter.json").read_text())
    decisions = [line.split("\t") for line in (run / "filtered" / "decisions.tsv").read_text().splitlines()]
    assert len(decisions) == summary["generated"] == len(queries.splitlines())
    kept = [d for d in decisions if d[3] == "kept"]
    assert summary["kept"] == len(kept) and all(0 < int(d[2]) <= 3 for d in kept)
    assert (run / "filtered" / "queries.synthetic.tsv").read_text().count("\n") == len(kept)


def test_synthetic_queries_are_mixed_in_at_the_real_share(tmp_path):
    from irbase.examples import SyntheticConfig, with_synthetic
    from tests.conftest import write_tsv

    real_q = {f"r{i}": f"real {i}" for i in range(3)}
    real_j = {q: {"p1": 1} for q in real_q}
    write_tsv(tmp_path / "q.tsv", [(f"gen-p{i}-0", f"synthetic {i}") for i in range(20)])
    write_tsv(tmp_path / "j.tsv", [(f"gen-p{i}-0", 0, f"p{i}", 1) for i in range(20)])
    config = SyntheticConfig(queries="{run_dir}/q.tsv", qrels="{run_dir}/j.tsv", real_share=0.25)
    queries, qrels, added = with_synthetic(real_q, real_j, config, str(tmp_path), "", seed=1)
    assert added == 9 and len(queries) == len(qrels) == 12  # 3 real make a quarter: 9 synthetic beside them
    assert all(qrels[q] == {q.split("-")[1]: 1} for q in queries if q.startswith("gen-"))
    assert with_synthetic(real_q, real_j, config, str(tmp_path), "", seed=1)[0] == queries  # seeded
    everything = with_synthetic(real_q, real_j, SyntheticConfig("{run_dir}/q.tsv", "{run_dir}/j.tsv", 0.1),
                                str(tmp_path), "", seed=1)
    assert everything[2] == 20  # 27 wanted, 20 exist
    assert with_synthetic(real_q, real_j, SyntheticConfig(), str(tmp_path), "", 1) == (real_q, real_j, 0)
    only = with_synthetic(real_q, real_j, SyntheticConfig("{run_dir}/q.tsv", "{run_dir}/j.tsv", 0.0),
                          str(tmp_path), "", seed=1)
    assert only[2] == len(only[0]) == len(only[1]) == 20 and not set(only[0]) & set(real_q)  # synthetic only
    with pytest.raises(ValueError, match="real_share"):
        SyntheticConfig("a", "b", real_share=1.5)
    with pytest.raises(ValueError, match="synthetic.queries"):
        SyntheticConfig(real_share=0)
