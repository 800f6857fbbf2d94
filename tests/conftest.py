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


@pytest.fixture
def tiny_msmarco(tmp_path: Path) -> Path:
    """A dataset directory in the official MS MARCO layout, made in the test."""
    root = tmp_path / "tiny"
    write_tsv(root / "collection.tsv", PASSAGES.items())
    write_tsv(root / "queries.dev.tsv", QUERIES.items())
    write_tsv(root / "qrels.dev.tsv", [(q, 0, p, r) for q, j in QRELS.items() for p, r in j.items()])
    return root
