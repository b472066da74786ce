"""Calibration of the per-class Gaussians: shrinkage, Free Lunch, nearest classes (no Ray)."""

import numpy as np
from conftest import toy

from raylt.latent.calibrate import calibrated_gaussians, free_lunch_gaussians, nearest_classes
from raylt.latent.sampling import TRANSFORMS
from raylt.latent.stats import class_moments


def test_calibrated_covariance_is_the_shrinkage_formula():
    counts = [60, 30, 12, 2, 1]
    x, y = toy(counts)
    kappa, k, eps = 10.0, 2, 0.05
    m = class_moments(x, y, 5, rank=5)  # rank = D: roots exact, nothing left for the pooled term
    g = calibrated_gaussians(m, kappa=kappa, neighbours=k, eps=eps)
    covs = [np.cov(x[y == c], rowvar=False) if counts[c] > 1 else np.zeros((5, 5)) for c in range(5)]
    ridge = eps * np.trace(m.pooled_covariance()) / 5
    for c in range(5):
        d2 = ((m.means - m.means[c]) ** 2).sum(1)
        d2[c] = np.inf
        d2[np.array(counts) < 2] = np.inf  # only classes with a covariance are neighbours
        nb = np.argsort(d2)[:k]
        w = np.array(counts)[nb] / np.array(counts)[nb].sum()
        lam = counts[c] / (counts[c] + kappa) if counts[c] > 1 else 0.0
        expect = lam * covs[c] + (1 - lam) * sum(wi * covs[j] for wi, j in zip(w, nb)) + ridge * np.eye(5)
        assert np.allclose(g.covariance(c), expect, atol=1e-5), c
        assert np.linalg.eigvalsh(g.covariance(c)).min() > 0  # positive definite, 1 and 2 images too


def test_free_lunch_borrows_from_nearest_base_classes():
    counts = [80, 70, 60, 3]
    x, y = toy(counts)
    t = TRANSFORMS["tukey"][0](x)
    m = class_moments(t, y, 4, rank=5)
    g = free_lunch_gaussians(m, base_min=20, neighbours=2, alpha=0.1)
    nb = nearest_classes(m.means, 2, np.array(counts) >= 20)[3]
    assert np.allclose(g.means[3], (m.means[nb].sum(0) + m.means[3]) / 3, atol=1e-6)
    assert np.allclose(g.means[:3], m.means[:3], atol=1e-6)  # base classes keep their own
    expect = sum(np.cov(t[y == j], rowvar=False) for j in nb) / 2 + 0.1 * np.trace(m.pooled_covariance()) / 5 * np.eye(5)
    assert np.allclose(g.covariance(3), expect, atol=1e-5)


def test_nearest_classes_match_brute_force():
    means = np.random.default_rng(3).normal(size=(50, 7))
    cand = np.arange(50) % 3 != 0
    got = nearest_classes(means, 4, cand, block=16)
    for c in range(50):
        d = ((means[cand] - means[c]) ** 2).sum(1)
        ids = np.flatnonzero(cand)
        order = ids[np.argsort(d)]
        assert list(got[c]) == [j for j in order if j != c][:4]
