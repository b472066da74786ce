"""Post-hoc per-class offsets: the registry's functions, the choice of tau, and what they do
for the tail classes of a head fitted on long-tailed Gaussian classes."""

import numpy as np

from raylt.head.posthoc import TAUS, balanced_accuracy, choose_tau, offsets


def test_offsets_of_each_adjustment():
    n = np.array([100, 10, 1, 0])
    np.testing.assert_allclose(offsets("count", n), [0.01, 0.1, 1.0, 1.0])  # empty classes count as one
    np.testing.assert_allclose(offsets("prior", n), -np.log(np.maximum(n, 1) / 111))
    assert offsets("none", n) is None


def test_balanced_accuracy_weighs_classes_equally():
    y = np.array([0] * 8 + [1] * 2)
    pred = np.zeros(10, np.int64)
    assert balanced_accuracy(pred, y, 3) == 0.5  # class 2 is absent: not counted


def test_choose_tau_takes_the_best_and_the_smallest_on_ties():
    # class 1 (one image) loses its rows by 0.3 logits: 0.3 < 0.99 tau recovers them, and
    # class 0's row stays right while 0.99 tau < 2
    logits = np.array([[1.0, 0.7], [1.0, 0.7], [2.0, 0.0]])
    y = np.array([1, 1, 0])
    tau, scores = choose_tau(logits, y, offsets("count", np.array([100, 1])))
    assert scores[0.0] == 0.5  # class 0 right, class 1 lost
    assert tau == min(t for t in TAUS if 0.3 < t * 0.99 < 2.0)
    assert scores[tau] == 1.0
    assert choose_tau(np.array([[2.0, 0.0]]), np.array([0]), np.array([0.0, 1.0]))[0] == 0.0  # nothing to gain


def test_count_offsets_chosen_on_val_lift_the_tail_of_a_shared_covariance_head():
    """Nearest-mean classes in 64 dimensions, 200 images per head class and 4 per tail class:
    the tail's noisy means lose test images to the head classes; tau / n_c chosen on a val
    split gives them back on a test split it never saw."""
    rng = np.random.default_rng(0)
    d, c = 64, 20
    counts = np.array([200] * 10 + [4] * 10)
    centres = rng.normal(size=(c, d)) * 0.35
    means = np.stack([(centres[k] + rng.normal(size=(n, d))).mean(0) for k, n in enumerate(counts)])
    logits = lambda x: x @ means.T - 0.5 * (means**2).sum(1)  # noqa: E731  the LDA head for identity covariance
    y_val, y_te = np.repeat(np.arange(c), 30), np.repeat(np.arange(c), 200)
    x_val = centres[y_val] + rng.normal(size=(len(y_val), d))
    x_te = centres[y_te] + rng.normal(size=(len(y_te), d))
    f = offsets("count", counts)
    tau, _ = choose_tau(logits(x_val), y_val, f)
    tail = y_te >= 10
    before = (logits(x_te).argmax(1) == y_te)[tail].mean()
    after = ((logits(x_te) + tau * f).argmax(1) == y_te)[tail].mean()
    assert tau > 0 and after > before + 0.1, (tau, before, after)
    assert balanced_accuracy((logits(x_te) + tau * f).argmax(1), y_te, c) > balanced_accuracy(logits(x_te).argmax(1), y_te, c)


def test_post_hoc_settings_keep_a_run_s_checkpoints_and_training_settings_do_not():
    from raylt.config import load_config
    from raylt.preflight import fit_key

    base = fit_key(load_config(None, []))
    assert fit_key(load_config(None, ["head.posthoc=prior", "head.posthoc_tau=4"])) == base  # applied after training
    assert fit_key(load_config(None, ["head.tau=0.5"])) != base
    # Local mode (`auto` on one node) and a one-worker group train alike and resume each other's
    # checkpoints; two workers train another head.
    one, local = (fit_key(load_config(None, [f"train.num_workers={n}"])) for n in (1, 0))
    assert one == base == local
    assert fit_key(load_config(None, ["train.num_workers=2"])) != base


def test_choose_tau_over_row_blocks_scores_every_tau_as_a_full_argmax_does():
    rng = np.random.default_rng(3)
    logits, y = rng.normal(size=(1000, 40)).astype(np.float32), rng.integers(0, 40, 1000)  # 4 blocks, one cut short
    f = offsets("count", rng.integers(1, 200, 40))
    _, scores = choose_tau(logits, y, f)
    assert scores == {t: balanced_accuracy((logits + (t * f).astype(np.float32)).argmax(1), y, 40) for t in TAUS}
