"""The query generator: a base LM fine-tuned to write a passage's queries (doc2query), the synthetic
training data and document expansion built from what it writes."""
