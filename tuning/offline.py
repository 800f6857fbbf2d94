"""Rankings a built run would serve, rebuilt offline: one first-stage pass per query and one reranker call
per distinct batch give every (rerank depth, reranker weight) at once, so the sweep and the fusion fit search
grids without searching again."""
from __future__ import annotations

from typing import Sequence

from tqdm import tqdm

from irbase.fusion import fuse_reranked, merge_reranked
from pipeline.retriever import Retriever

Candidates = dict[int, dict[str, tuple[list[str], list[float]]]]  # candidates wanted -> qid -> (ids, scores)


def batches(depth: int, size: int) -> list[tuple[int, int]]:
    """The [start, end) rank ranges `Retriever` reranks `depth` candidates in, one reranker call each."""
    return [(start, min(start + size, depth)) for start in range(0, depth, size)]


def offline_runs(retriever: Retriever, queries: list[tuple[str, str]], depths: Sequence[int],
                 weights: Sequence[float | None], k: int = 100,
                 first: Candidates | None = None,
                 ) -> dict[tuple[int, float | None], dict[str, list[str]]]:
    """The ranking `Retriever(depth=d, rerank_weight=w).search(q, k)` returns (with no deadline), for every
    depth d and weight w (depth 0: the first stage, keyed by weight None). `first` caches the first stage
    across calls (the sweep's variants share it)."""
    serving = retriever.serving
    first = {} if first is None else first
    for wanted in sorted({max(k, serving.candidates, d) for d in depths} - set(first)):
        first[wanted] = {qid: retriever.candidates(text, wanted)
                         for qid, text in tqdm(queries, desc=f"first stage, top {wanted}", unit="q")}
    scores: dict[tuple[str, int, int, int], list[float]] = {}
    if any(depths):
        for qid, text in tqdm(queries, desc=f"reranking ({serving.variant})", unit="q"):
            spans = {(wanted, *span) for d in depths if d > 0 for wanted in [max(k, serving.candidates, d)]
                     for span in batches(min(d, len(first[wanted][qid][0])), serving.rerank_batch)}
            texts = retriever.store.get_many(list({p for w, s, e in spans for p in first[w][qid][0][s:e]}))
            for wanted, start, end in spans:
                batch = [texts[p] for p in first[wanted][qid][0][start:end]]
                scores[(qid, wanted, start, end)] = [float(s) for s in retriever.reranker.score(text, batch)]
    runs = {}
    for depth in depths:
        wanted = max(k, serving.candidates, depth)
        for weight in (weights if depth else [None]):
            run = {}
            for qid, _ in queries:
                pids, first_scores = first[wanted][qid]
                head = min(depth, len(pids))
                ce = [s for span in batches(head, serving.rerank_batch) for s in scores[(qid, wanted, *span)]]
                order = fuse_reranked(serving.fusion, pids[:head], first_scores[:head], ce, weight, serving.fusion_k)
                run[qid] = [p for p, _ in merge_reranked(order, pids[head:], first_scores[head:])][:k]
            runs[(depth, weight)] = run
    return runs
