"""Retrieve and rerank: `from pipeline import Retriever, Result`."""
from irbase.search import Result
from pipeline.retriever import Retriever, SearchResponse

__all__ = ["Result", "Retriever", "SearchResponse"]
