"""Tools for tests and benchmarks, not the library: generated CLIP-like embeddings (simulate.py)."""
