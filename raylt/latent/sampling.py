"""Synthetic embeddings: the sampler registry and the torch sampler run inside train workers.

A sampler is registered with the feature transform its statistics are computed in and a
function that turns those statistics into `Gaussians` (raylt.latent.calibrate), or into nothing
(`none`). `GaussianSampler.sample(labels, generator)` draws one embedding per label: the
class mean plus one independent draw per covariance term, mapped back from the transformed
space and re-normalised to the unit sphere, since the real embeddings are L2-normalised.

Samples are never stored: each worker draws fresh ones every epoch with a generator seeded
by (seed, epoch, worker rank), so the synthetic stream is reproducible and scales with the
number of workers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from raylt.choices import SAMPLERS  # declared there: names, help, this module
from raylt.latent.calibrate import Gaussians, calibrated_gaussians, free_lunch_gaussians
from raylt.latent.transforms import TRANSFORMS


@dataclass(frozen=True)
class SamplerSpec:
    transform: str | None  # space of the statistics it needs; None: needs none
    build: Callable[..., Gaussians | None]  # (moments, sampler config) -> Gaussians


def _gaussian(m, cfg) -> Gaussians:
    return calibrated_gaussians(m, kappa=cfg.kappa, neighbours=cfg.neighbours, eps=cfg.eps)


def _free_lunch(m, cfg) -> Gaussians:
    return free_lunch_gaussians(m, base_min=cfg.base_min, neighbours=cfg.neighbours, alpha=cfg.eps)


SAMPLERS.register("none")(SamplerSpec(None, lambda m, cfg: None))
SAMPLERS.register("gaussian")(
    SamplerSpec("identity", _gaussian)
)
SAMPLERS.register("free_lunch")(
    SamplerSpec("tukey", _free_lunch)
)


def synthetic_counts(counts: np.ndarray, target: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Samples per class and epoch: every class topped up to `target` (none for empty classes)."""
    out = np.maximum(int(target) - np.asarray(counts, dtype=np.int64), 0)
    return np.where(valid if valid is not None else counts > 0, out, 0)


def worker_labels(syn_counts: np.ndarray, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This worker's shuffled share of the epoch's synthetic labels (disjoint across ranks)."""
    labels = np.repeat(np.arange(len(syn_counts)), syn_counts)
    rng = np.random.default_rng((seed, epoch, 0xC1A55))  # one order for all ranks, then split
    labels = labels[rng.permutation(len(labels))]
    return labels[rank::world]


def shared_tensor(a: np.ndarray, device) -> torch.Tensor:
    """A tensor sharing `a`'s memory on CPU. Arrays from Ray's object store are read-only, and
    torch warns about those; the sampler only reads them, and a copy would double the largest
    object of a fit (C x rank x D floats)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(np.ascontiguousarray(a), device=device)


class GaussianSampler:
    """Draws synthetic embeddings from `Gaussians` with torch, on the worker's device."""

    def __init__(self, g: Gaussians, device: str | torch.device = "cpu"):
        t = lambda a: shared_tensor(a, device)  # noqa: E731
        self.means, self.pooled_factor = t(g.means), t(g.pooled_factor)
        c, r, d = g.roots.shape
        self.rank = r
        self.roots = t(g.roots.reshape(c * r, d))  # rows of class j: j*r .. j*r + r - 1
        self.sources, self.weights, self.shared = t(g.sources), t(g.weights), t(g.shared)
        self.eps, self.floor = float(g.eps), float(g.pooled_floor)
        self.inverse = TRANSFORMS[g.transform][1]
        self.valid = g.valid

    def sample(self, labels: torch.Tensor, generator: torch.Generator, normalize: bool = True) -> torch.Tensor:
        b, d = len(labels), self.means.shape[1]
        dev, r, m = self.means.device, self.rank, self.sources.shape[1]
        z = self.means[labels].clone()
        # All low-rank terms at once: for each sample, the weighted sum of m r rows of the
        # stacked roots [C r, D] (a block of r per source class), which is what embedding_bag
        # computes (a fused gather-and-sum). Gathering a [r, D] root per sample instead moves
        # B m r D floats per batch and was 10x slower; a sparse [B, C r] matrix times the roots
        # gave the same numbers 2-3x slower (bench/sampling.py).
        src, w = self.sources[labels], self.weights[labels] * (self.sources[labels] >= 0)
        g = torch.randn(b, m, r, device=dev, generator=generator) * w[..., None]
        cols = src.clamp(min=0)[..., None] * r + torch.arange(r, device=dev)
        z += torch.nn.functional.embedding_bag(cols.reshape(b, m * r), self.roots,
                                               per_sample_weights=g.reshape(b, m * r), mode="sum")
        shared = self.shared[labels, None]
        if self.pooled_factor.shape[1]:
            k = self.pooled_factor.shape[1]
            z += (torch.randn(b, k, device=dev, generator=generator) @ self.pooled_factor.T) * shared
        noise = (shared**2 * self.floor + self.eps).sqrt()  # isotropic floor of P plus the ridge
        z += torch.randn(b, d, device=dev, generator=generator) * noise
        z = self.inverse(z)
        return torch.nn.functional.normalize(z, dim=1) if normalize else z


def build_gaussians(name: str, moments, cfg) -> Gaussians | None:
    return SAMPLERS.get(name).build(moments, cfg)
