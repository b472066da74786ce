"""Latent statistics and sampling: per-class moments (stats.py, reduced over shards by
stats_ray.py), calibrated Gaussians (calibrate.py) and the synthetic stream (sampling.py)."""
