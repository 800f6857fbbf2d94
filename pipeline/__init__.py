"""What users touch: the Retriever that chains the first stage and the reranker."""
