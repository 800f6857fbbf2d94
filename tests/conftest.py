from __future__ import annotations

from pathlib import Path

import pytest

SHARED_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "msmarco-mini"

PASSAGES = {
    "p1": "The capital of Australia is Canberra, chosen as a compromise between Sydney and Melbourne.",
    "p2": "Sydney is the largest city in Australia and home to the Sydney Opera House.",
    "p3": "Goldfish grow to fit the size of their tank, and can live for decades.",
    "p4": "Bluetooth is a short range wireless standard; WiFi connects devices to a network.",
    "p5": "The Manhattan Project produced the first atomic bombs during World War II.",
    "p6": "Caffeine during pregnancy should be limited to about 200 mg per day.",
}
QUERIES = {
    "q1": "what is the capital of australia",
    "q2": "do goldfish grow",
    "q3": "wifi vs bluetooth",
    "q4": "caffeine pregnancy limit",
}
QRELS = {"q1": {"p1": 1}, "q2": {"p3": 1}, "q3": {"p4": 2, "p2": 0}, "q4": {"p6": 1}}


def write_tsv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_train_dev(data: Path, mined: Path) -> None:
    """train and dev splits over the tiny collection, plus a mined-negatives file, for training runs."""
    write_tsv(data / "collection.tsv", PASSAGES.items())
    for split in ("train", "dev"):
        write_tsv(data / f"queries.{split}.tsv", QUERIES.items())
        write_tsv(data / f"qrels.{split}.tsv", [(q, 0, p, r) for q, j in QRELS.items() for p, r in j.items()])
    write_tsv(mined, [("q1", "p2", 1, 3.0), ("q2", "p5", 1, 1.0)])


@pytest.fixture
def tiny_msmarco(tmp_path: Path) -> Path:
    """A dataset directory in the official MS MARCO layout, made in the test."""
    root = tmp_path / "tiny"
    write_tsv(root / "collection.tsv", PASSAGES.items())
    write_tsv(root / "queries.dev.tsv", QUERIES.items())
    write_tsv(root / "qrels.dev.tsv", [(q, 0, p, r) for q, j in QRELS.items() for p, r in j.items()])
    return root


def _train_tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", pair="[CLS] $A [SEP] $B", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", bos_token="[CLS]", eos_token="[SEP]")


def make_tiny_lm(path: Path, kind: str, texts) -> Path:
    """A randomly initialised model of `kind` ('decoder': Gemma 3, 'encoder': BERT) with a tokenizer
    trained here on `texts`: no downloads."""
    import torch
    from transformers import AutoModel, BertConfig, Gemma3TextConfig

    tokenizer = _train_tokenizer(list(texts) + ["query : passage :"])
    vocab = len(tokenizer)
    if kind == "decoder":
        config = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  max_position_embeddings=256, sliding_window=64, pad_token_id=0,
                                  bos_token_id=2, eos_token_id=3,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    else:
        config = BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("lm") / "decoder", "decoder",
                        list(PASSAGES.values()) + list(QUERIES.values()))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("lm") / "encoder", "encoder",
                        list(PASSAGES.values()) + list(QUERIES.values()))


def build_tiny_run(root: Path, tiny_decoder: Path, tiny_encoder: Path) -> Path:
    """A served run over the tiny collection: random bi-encoder and cross-encoder (fp32 ONNX), HNSW index,
    passage store. Rankings are arbitrary but deterministic."""
    from dataclasses import asdict

    import torch

    from biencoder.encode import EncodeConfig
    from biencoder.index import IndexConfig
    from biencoder.model import BiEncoder, BiEncoderConfig
    from crossencoder.export import ExportConfig, export_variants
    from crossencoder.model import CrossEncoder, CrossEncoderConfig
    from irbase.artifacts import model_fingerprint
    from irbase.lm import BaseLMConfig
    from pipeline import Retriever
    from pipeline.config import RunRecord, ServingConfig

    collection = write_tsv(root / "data" / "collection.tsv", PASSAGES.items())
    run = root / "run"
    BiEncoder.from_base(BiEncoderConfig(base_lm=BaseLMConfig(name=str(tiny_encoder)))).save(run / "bi" / "model")
    ce = CrossEncoder.from_base(CrossEncoderConfig(base_lm=BaseLMConfig(name=str(tiny_decoder), bidirectional=True)))
    torch.nn.init.normal_(ce.head.weight, std=1.0)
    ce.save(run / "ce" / "model")
    export_variants(ce, run / "ce" / "onnx", ExportConfig(variants=["fp32"]),
                    [(q, list(PASSAGES.values())) for q in QUERIES.values()],
                    extra={"model": model_fingerprint(run / "ce" / "model")})
    RunRecord(serving=ServingConfig(biencoder="bi", crossencoder="ce", variant="fp32", candidates=5, depth=3, fusion="rrf",
                                    threads=1, rerank_batch=2, query_bf16=False, rerank_weight=None),
              fingerprints={"biencoder": model_fingerprint(run / "bi" / "model"),
                            "crossencoder": model_fingerprint(run / "ce" / "model")},
              encode=asdict(EncodeConfig(batch_size=4, shard_size=4, dtype="float32", bf16=False)),
              index=asdict(IndexConfig(kind="hnsw", m=8, ef_construction=16, ef_search=16, gpu=False))).save(run)
    Retriever(run, depth=0).embed_and_store_corpus(collection)
    return run


@pytest.fixture(scope="session")
def built_tiny_run(tmp_path_factory, tiny_decoder, tiny_encoder) -> Path:
    """One tiny run for the whole session (building one takes ~20 s); modules take copies (`copy_tiny_run`)."""
    return build_tiny_run(tmp_path_factory.mktemp("tiny-run"), tiny_decoder, tiny_encoder)


def copy_tiny_run(run: Path, root: Path) -> Path:
    """A private copy of a tiny run and its data folder under `root`; returns the run directory. Its record
    still names the original collection file, which holds the same bytes."""
    import shutil

    shutil.copytree(run.parent / "data", root / "data")
    shutil.copytree(run, root / "run")
    return root / "run"
