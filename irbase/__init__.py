"""Shared foundation for the retrieve-and-rerank system.

Data formats, metrics, run artifacts, configs and the BM25 baseline live here so that
`biencoder`, `crossencoder`, `pipeline` and `benchmarks` agree on them. Nothing in this
package imports from those packages.
"""
