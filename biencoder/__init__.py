"""First stage: a bi-encoder fine-tuned from a base LM with DeepSpeed, and its FAISS HNSW index."""
