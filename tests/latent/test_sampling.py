"""The synthetic stream: samples, transforms, budgets and worker shares (no Ray)."""

import numpy as np
from conftest import toy
import torch

from raylt.config import SamplerConfig
from raylt.latent.calibrate import calibrated_gaussians, load_gaussians, save_gaussians
from raylt.latent.sampling import TRANSFORMS, GaussianSampler, build_gaussians, synthetic_counts, worker_labels
from raylt.latent.stats import class_moments


def test_samples_have_the_target_mean_and_covariance():
    x, y = toy([200, 150, 5], d=4)
    g = calibrated_gaussians(class_moments(x, y, 3, rank=2), kappa=20, neighbours=1, eps=0.1)
    s = GaussianSampler(g)
    for c in range(3):
        z = s.sample(torch.full((200_000,), c), torch.Generator().manual_seed(c), normalize=False).double().numpy()
        assert np.allclose(z.mean(0), g.means[c], atol=0.02)
        assert np.allclose(np.cov(z, rowvar=False), g.covariance(c), atol=0.03 * np.abs(g.covariance(c)).max())


def test_samples_are_unit_norm_and_reproducible(tmp_path):
    x, y = toy([30, 3], d=6)
    g = build_gaussians("gaussian", class_moments(x, y, 2, rank=3), SamplerConfig())
    save_gaussians(g, tmp_path / "g.npz")
    a = GaussianSampler(load_gaussians(tmp_path / "g.npz")).sample(torch.tensor([0, 1, 1]), torch.Generator().manual_seed(5))
    b = GaussianSampler(g).sample(torch.tensor([0, 1, 1]), torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.allclose(a.norm(dim=1), torch.ones(3))


def test_tukey_transform_inverts():
    x = np.random.default_rng(0).normal(size=(10, 3))
    fwd, inv = TRANSFORMS["tukey"]
    assert np.allclose(inv(torch.from_numpy(fwd(x))).numpy(), x)


def test_synthetic_budget_and_worker_split():
    counts = np.array([500, 40, 3, 0])
    syn = synthetic_counts(counts, 100)
    assert list(syn) == [0, 60, 97, 0]  # a class without images cannot be sampled
    parts = [worker_labels(syn, seed=1, epoch=2, rank=r, world=3) for r in range(3)]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.repeat(np.arange(4), syn))
    assert np.array_equal(parts[1], worker_labels(syn, 1, 2, 1, 3))
    assert not np.array_equal(parts[1], worker_labels(syn, 1, 3, 1, 3))  # fresh every epoch
