"""The latent method's maths: calibration, sampling, losses, epochs, evaluation (no Ray)."""

import numpy as np
import pytest
import torch

from raylt.calibrate import calibrated_gaussians, free_lunch_gaussians, load_gaussians, nearest_classes, save_gaussians
from raylt.config import HeadConfig, SamplerConfig, TrainConfig
from raylt.errors import ConfigError
from raylt.evaluate import evaluate
from raylt.heads import build_head, build_loss
from raylt.sampling import TRANSFORMS, GaussianSampler, build_gaussians, synthetic_counts, worker_labels
from raylt.simulate import clip_like
from raylt.stats import class_moments, merge_all
from raylt.train import fit_local, predict_logits


def toy(counts, d=5, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts)
    centres = rng.normal(0, 2, (len(counts), d))
    x = centres[y] + rng.normal(0, 1, (len(y), d)) @ rng.normal(0, 0.5, (d, d))
    return x, y


def test_traces_merge_exactly():
    x, y = toy([40, 3, 1, 25], d=6)
    parts = np.array_split(np.random.default_rng(0).permutation(len(y)), 3)
    m = merge_all([class_moments(x[i], y[i], 4, rank=2) for i in parts])
    for c in range(4):
        xc = x[y == c] - x[y == c].mean(0)
        assert np.isclose(m.traces[c], (xc**2).sum())
    # rank 2 < D: classes 0 and 3 leave scatter out of their roots; 1 (3 images) and 2 do not
    assert m.residuals()[0] > 0 and m.residuals()[3] > 0 and np.allclose(m.residuals()[[1, 2]], 0)


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


def test_logit_adjusted_and_balanced_softmax_match_their_formulas():
    counts = np.array([90, 9, 1])
    logits = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    prior = counts / counts.sum()
    la = build_loss("logit_adjusted", counts, tau=0.7)(logits, y)
    shifted = logits + 0.7 * torch.log(torch.tensor(prior, dtype=torch.float32))
    assert torch.isclose(la, -torch.log_softmax(shifted, 1)[torch.arange(6), y].mean())
    bs = build_loss("balanced_softmax", counts, tau=0.0)(logits, y)
    n = torch.tensor(counts, dtype=torch.float32)
    p = n * logits.exp() / (n * logits.exp()).sum(1, keepdim=True)
    assert torch.isclose(bs, -p[torch.arange(6), y].log().mean(), atol=1e-6)
    assert torch.isclose(build_loss("ce", counts, 1.0)(logits, y), torch.nn.functional.cross_entropy(logits, y))


def test_unknown_registry_names_are_errors():
    with pytest.raises(ConfigError, match="did you mean 'logit_adjusted'"):
        build_loss("logit_adjust", np.ones(2), 1.0)
    with pytest.raises(ConfigError, match="registered: cosine, linear"):
        build_head("mlp", 4, 2, 1.0)


def test_text_initialised_heads_start_at_the_given_directions():
    init = np.random.default_rng(0).normal(size=(3, 8))
    unit = init / np.linalg.norm(init, axis=1, keepdims=True)
    for name in ("linear", "cosine"):
        head = build_head(name, 8, 3, scale=10.0, init=init)
        x = torch.tensor(unit, dtype=torch.float32)
        assert torch.equal(head(x).argmax(1), torch.arange(3))


def test_evaluate_groups_by_train_count():
    train = np.array([150, 50, 5])
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 0, 2, 0])
    m = evaluate(pred, labels, train, ["a", "b", "c"])
    assert (m["overall"], m["many"], m["medium"], m["few"]) == (4 / 6, 1.0, 0.5, 0.5)
    assert m["per_class"] == [1.0, 0.5, 0.5] and m["train_counts"] == [150, 50, 5]


def test_default_recipe_beats_plain_ce_on_few_shot_classes():
    """On CLIP-like long-tailed embeddings, the sampler lifts the few-shot classes."""
    counts = np.array([300] * 6 + [40] * 6 + [4] * 12)
    x, y, s = clip_like(counts, 60)
    tr = s == "train"
    m = class_moments(x[tr], y[tr], len(counts), rank=8)
    train_cfg = TrainConfig(epochs=15, batch_size=128)
    res = {}
    for name, loss in (("none", "ce"), ("gaussian", HeadConfig().loss)):
        g = build_gaussians(name, m, SamplerConfig())
        head = fit_local(x[tr], y[tr], counts, g, HeadConfig(loss=loss), train_cfg, target=100, seed=0)
        pred = predict_logits(head, x[~tr]).argmax(1)
        res[name] = evaluate(pred, y[~tr], counts, [str(i) for i in range(len(counts))])
    assert res["gaussian"]["few"] > res["none"]["few"] + 0.1, res
    assert res["gaussian"]["overall"] > res["none"]["overall"]


def test_inat_like_profile_has_inaturalist_2018_size_and_groups():
    from raylt.simulate import inat_like_profile

    p = inat_like_profile()
    assert (len(p), p.sum(), p.max(), p.min()) == (8142, 437_513, 1000, 2)
    assert ((p > 100).sum(), ((p >= 20) & (p <= 100)).sum(), (p < 20).sum()) == (842, 4076, 3224)
    assert np.all(np.diff(p) <= 0)  # ranked, head first
    quarter = inat_like_profile(2036)
    assert quarter.max() == 1000 and quarter.min() == 2 and abs(quarter.sum() - 437_513 / 4) < 500
