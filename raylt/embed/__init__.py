"""Embedding: images decoded on CPU tasks, encoded by a frozen backbone in Ray Data actors, kept in
the content-addressed store (stage.py), and read back as an `EmbeddingSet` by every later stage
(inputs.py)."""
