"""Experiments over one set of embeddings: the ablation, Ray Tune sweeps, and reports of MLflow
runs, with their shared tables and plots (tables.py)."""
