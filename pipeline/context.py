"""What a component needs from the run it serves: handed to every first stage's and reranker's `load`
and `build`, so a component reads the run without knowing `Retriever`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from biencoder.model import BiEncoder
from pipeline.config import RunRecord, ServingConfig
from pipeline.store import PassageStore

CORPUS_DIR = "corpus"


@dataclass
class RunContext:
    run_dir: Path
    record: RunRecord
    serving: ServingConfig
    model: BiEncoder | None = None       # the run's bi-encoder (encodes queries and the corpus)
    model_id: str = ""                   # its fingerprint: the dense index must have been built by it
    store: PassageStore | None = None    # the passage store, once the corpus is stored
    collection: str = ""                 # while building: the collection's fingerprint
    embeddings_dir: Path | None = None   # while building: where the corpus embedding shards go
    verify: bool = True                  # check every artifact's sha256 at load (sizes are always checked)

    @property
    def corpus(self) -> Path:
        return self.run_dir / CORPUS_DIR
