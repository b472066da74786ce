"""The whitened head: its change of variables, the covariance it whitens by, and folding it
back into the plain linear head that is saved and served."""

import numpy as np
import pytest
import torch

from raylt.head.artifact import HeadArtifact, load_head
from raylt.head.modules import build_head
from raylt.head.whiten import oas_shrinkage, whitening
from raylt.latent.stats import class_moments


def _anisotropic(n=4000, d=16, c=4, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.geomspace(3.0, 0.01, d)  # condition number 9e4: what whitening is for
    y = rng.integers(0, c, n)
    x = rng.normal(size=(c, d))[y] + rng.normal(size=(n, d)) * scales + 5.0  # and a large common offset
    return x, y


def test_whitening_maps_the_shrunk_pooled_covariance_to_the_identity_over_d():
    x, y = _anisotropic()
    m = class_moments(x, y, 4, rank=2)
    w = whitening(m, ridge=0.0)
    s = m.pooled_covariance()
    d = len(s)
    shrunk = (1 - w.shrinkage) * s + w.shrinkage * np.trace(s) / d * np.eye(d)
    t = w.transform.astype(np.float64)
    np.testing.assert_allclose(t.T @ shrunk @ t, np.eye(d) / d, atol=1e-5)
    np.testing.assert_allclose(w.mean, x.mean(0), rtol=1e-5)
    assert w.shrinkage < 0.01  # 4,000 rows in 16 dimensions: the covariance is well estimated
    assert whitening(m, ridge=0.3).shrinkage == 0.3  # the ridge is a floor


def test_oas_shrinks_more_when_rows_are_few_and_the_truth_is_isotropic():
    rng = np.random.default_rng(1)
    few = np.cov(rng.normal(size=(40, 100)), rowvar=False)
    many = np.cov(rng.normal(size=(20000, 100)) * np.geomspace(1, 0.01, 100), rowvar=False)
    assert oas_shrinkage(few, 39) > 0.5
    assert oas_shrinkage(many, 19999) < 0.01
    assert oas_shrinkage(np.zeros((3, 3)), 10) == 1.0  # no spread at all: all identity


def test_a_whitened_head_saves_as_the_linear_head_with_the_same_logits(tmp_path):
    x, y = _anisotropic()
    w = whitening(class_moments(x, y, 4, rank=2), ridge=0.01)
    head = build_head("whitened", x.shape[1], 4, 16.0, whiten=w)
    with torch.no_grad():
        head.weight.normal_()
        head.bias.normal_()
        expected = head(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    HeadArtifact.from_state(head.state_dict(), "whitened", 16.0).save(tmp_path / "head.npz")
    saved = load_head(tmp_path / "head.npz")
    assert saved.kind == "linear" and saved.weight.shape == (4, x.shape[1])
    np.testing.assert_allclose(saved.logits(x), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_text_init_starts_a_whitened_head_at_the_raw_linear_init(tmp_path):
    x, y = _anisotropic()
    w = whitening(class_moments(x, y, 4, rank=2), ridge=0.01)
    init = np.random.default_rng(2).normal(size=(4, x.shape[1]))
    a = HeadArtifact.from_state(build_head("whitened", x.shape[1], 4, 16.0, init=init, whiten=w).state_dict(),
                                "whitened", 16.0)
    b = HeadArtifact.from_state(build_head("linear", x.shape[1], 4, 16.0, init=init).state_dict(), "linear", 16.0)
    np.testing.assert_allclose(a.weight, b.weight, atol=1e-3)
    np.testing.assert_allclose(a.bias, b.bias, atol=1e-2)


def test_a_whitened_head_refuses_to_build_without_its_whitening():
    with pytest.raises(ValueError, match="needs the whitening"):
        build_head("whitened", 4, 2, 1.0)


def test_whitening_the_rows_or_the_weights_gives_the_same_logits_and_gradients():
    x, y = _anisotropic()
    w = whitening(class_moments(x, y, 4, rank=2), ridge=0.01)
    head = build_head("whitened", x.shape[1], 4, 16.0, whiten=w)
    few, many = torch.as_tensor(x[:3], dtype=torch.float32), torch.as_tensor(x[:40], dtype=torch.float32)
    out = []
    for batch in (few, many):  # 3 rows < 4 classes: rows whitened; 40 rows: weights folded
        head.zero_grad()
        z = head(batch)
        z[:3].sum().backward()
        out.append((z[:3].detach(), head.weight.grad.clone()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-4)
