"""Temperature scaling and the expected calibration error, and folding T into head.npz."""

import numpy as np

from raylt.head.artifact import HeadArtifact, load_head, softmax
from raylt.head.calibration import expected_calibration_error, fit_temperature, mean_nll


def _labelled(n=20000, c=10, seed=0):
    """Logits and labels drawn from softmax(logits): probabilities that are calibrated."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 2.0
    p = softmax(z)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z, y


def test_the_fitted_temperature_undoes_overconfidence():
    z, y = _labelled()
    assert abs(fit_temperature(z, y) - 1.0) < 0.05
    assert abs(fit_temperature(3.0 * z, y) - 3.0) < 0.15  # logits three times too large
    assert abs(fit_temperature(0.5 * z, y) - 0.5) < 0.03


def test_the_fitted_temperature_is_the_nll_minimum_and_stays_in_its_range():
    z, y = _labelled(c=50, seed=2)
    for scale in (0.2, 1.0, 7.0):
        t = fit_temperature(scale * z, y)
        best = mean_nll(scale * z, y, t)
        assert best <= min(mean_nll(scale * z, y, t * f) for f in (0.99, 1.01)) + 1e-12
    separable = np.eye(4)[np.arange(400) % 4] * 10.0  # every row right and far apart: T -> 0
    assert abs(fit_temperature(separable, np.arange(400) % 4) / np.exp(-3.0) - 1) < 1e-3
    assert np.exp(-3.0) <= fit_temperature(np.zeros((10, 3)), np.zeros(10, np.int64)) <= np.exp(3.0)  # flat: any T


def test_ece_is_small_for_calibrated_probabilities_and_falls_after_scaling():
    z, y = _labelled()
    assert expected_calibration_error(z, y) < 0.02
    over = 3.0 * z
    t = fit_temperature(over, y)
    before, after = expected_calibration_error(over, y), expected_calibration_error(over, y, t)
    assert before > 0.1 and after < 0.02
    assert after == expected_calibration_error(over / t, y)
    hits = np.log(np.array([[0.9, 0.1], [0.2, 0.8]]))  # logits whose softmax is these probabilities
    assert abs(expected_calibration_error(hits, np.array([0, 1])) - 0.15) < 1e-12  # both right, 0.85 mean confidence


def test_blocks_of_rows_give_the_whole_s_figures(monkeypatch):
    """The NLL, its derivatives, the confidences and tau's scores go through row blocks, so
    8,142-class logits never take N x C float64 at once: the blocks change nothing."""
    import raylt.head.calibration as cal
    import raylt.head.posthoc as posthoc

    z, y = _labelled(n=1000, c=30, seed=4)
    f = 1.0 / np.arange(1, 31)
    whole = (fit_temperature(3 * z, y), mean_nll(z, y, 2.0), expected_calibration_error(z, y),
             posthoc.choose_tau(z, y, f)[1])
    monkeypatch.setattr(posthoc, "_BLOCK", 7)  # the calibration's blocks too (posthoc.row_blocks)
    blocked = (fit_temperature(3 * z, y), mean_nll(z, y, 2.0), expected_calibration_error(z, y),
               posthoc.choose_tau(z, y, f)[1])
    np.testing.assert_allclose(blocked[:3], whole[:3], rtol=1e-9)
    assert blocked[3] == whole[3]
    conf, pred = cal.confidences(z)
    np.testing.assert_allclose(conf, softmax(z).max(1), rtol=1e-6)
    assert (pred == z.argmax(1)).all()


def test_dividing_a_saved_head_divides_its_logits_and_offsets_reach_every_kind(tmp_path):
    import torch

    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    for kind in ("linear", "cosine"):
        state = {"weight": torch.tensor(rng.normal(size=(3, 4)), dtype=torch.float32),
                 "bias": torch.tensor(rng.normal(size=3), dtype=torch.float32)}
        path = tmp_path / f"{kind}.npz"
        HeadArtifact.from_state(state, kind, 16.0).save(path)
        before = load_head(path).logits(x)
        load_head(path).divide_logits(2.5).save(path)
        after = load_head(path).logits(x)
        np.testing.assert_allclose(after, before / 2.5, rtol=1e-5, atol=1e-5)
        assert (after.argmax(1) == before.argmax(1)).all()
        shifted = load_head(path).add_to_bias(np.array([0.0, 1.0, -2.0])).logits(x)  # post-hoc offsets
        np.testing.assert_allclose(shifted - after, np.tile([0.0, 1.0, -2.0], (5, 1)), atol=1e-5)
