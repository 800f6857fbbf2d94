"""Second stage: a cross-encoder reranker fine-tuned from a base LM, exported to ONNX."""
