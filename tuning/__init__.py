"""Fitting what a built run serves, on a tuning split, and writing it into the run's pipeline.json with
its provenance: `python -m tuning.fusion` (the first stage's BM25 weight) and `python -m tuning.sweep`
(rerank depth x variant x reranker weight against p95). `benchmarks` only measures; these decide."""
