"""Temperature scaling and the expected calibration error, and folding T into head.npz."""

import numpy as np

from raylt.head.artifact import divide_logits, head_logits, load_head, save_head, softmax
from raylt.head.calibration import expected_calibration_error, fit_temperature


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


def test_ece_is_small_for_calibrated_probabilities_and_falls_after_scaling():
    z, y = _labelled()
    assert expected_calibration_error(softmax(z), y) < 0.02
    over = 3.0 * z
    t = fit_temperature(over, y)
    before, after = expected_calibration_error(softmax(over), y), expected_calibration_error(softmax(over / t), y)
    assert before > 0.1 and after < 0.02
    hits = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert abs(expected_calibration_error(hits, np.array([0, 1])) - 0.15) < 1e-12  # both right, 0.85 mean confidence


def test_dividing_a_saved_head_divides_its_logits(tmp_path):
    import torch

    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    for kind in ("linear", "cosine"):
        state = {"weight": torch.tensor(rng.normal(size=(3, 4)), dtype=torch.float32),
                 "bias": torch.tensor(rng.normal(size=3), dtype=torch.float32)}
        path = tmp_path / f"{kind}.npz"
        save_head(state, kind, 16.0, path)
        before = head_logits(load_head(path), x)
        divide_logits(path, 2.5)
        after = head_logits(load_head(path), x)
        np.testing.assert_allclose(after, before / 2.5, rtol=1e-5, atol=1e-5)
        assert (after.argmax(1) == before.argmax(1)).all()
