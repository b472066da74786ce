"""The class text's maths: zero-shot logits, the folded ensemble, the mean prior and its
shrinkage; and what class text does to `LongTailHead` on generated embeddings with a text view."""

import numpy as np
import pytest

from raylt.head.artifact import HeadArtifact
from raylt.head.estimator import LongTailHead
from raylt.head.text import (STEPS, ZERO_SHOT_SCALE, ensemble_weights, fold_ensemble, left_out_residuals, mean_prior, unit_rows,
                             zero_shot_logits)
from raylt.testing.simulate import LatentSpec, generate


def test_the_folded_ensemble_gives_the_heads_logits_plus_alpha_times_zero_shot():
    rng = np.random.default_rng(0)
    w, b, text, x = rng.normal(size=(5, 16)), rng.normal(size=5), rng.normal(size=(5, 16)), rng.normal(size=(7, 16))
    head = HeadArtifact("linear", w.astype(np.float32), b.astype(np.float32))
    fw, fb = fold_ensemble(w, b, text, 0.3)
    folded = HeadArtifact("linear", fw.astype(np.float32), fb.astype(np.float32))
    want = head.logits(x) + 0.3 * ZERO_SHOT_SCALE * x @ unit_rows(text).T
    assert np.allclose(folded.logits(x), want, atol=1e-3)
    assert np.allclose(zero_shot_logits(x, text), ZERO_SHOT_SCALE * x @ unit_rows(text).T)
    # Centred on c: the zero-shot logits less those of c, each class's bias, still one W x + b.
    c = rng.normal(size=16)
    cw, cb = fold_ensemble(w, b, text, 0.3, center=c)
    centred = HeadArtifact("linear", cw.astype(np.float32), cb.astype(np.float32))
    want = head.logits(x) + 0.3 * ZERO_SHOT_SCALE * (x - c) @ unit_rows(text).T
    assert np.allclose(centred.logits(x), want, atol=1e-3)
    assert np.allclose(zero_shot_logits(x, text, center=c), zero_shot_logits(x, text) - zero_shot_logits(c[None], text))
    # Auxiliary rows beyond the targets' text are left as they are.
    w6, b6 = np.vstack([w, np.ones((1, 16))]), np.arange(6.0)
    fw6, fb6 = fold_ensemble(w6, b6, text, 0.3, center=c)
    assert np.array_equal(fw6[5], np.ones(16)) and fb6[5] == 5.0


def test_ensemble_weights_take_zero_shots_spread_from_the_rows_moments():
    rng = np.random.default_rng(1)
    x, text, center = rng.normal(size=(300, 16)), rng.normal(size=(7, 16)), rng.normal(size=16)
    head = 3.0 * rng.normal(size=(300, 7))
    ratio = np.std(head) / np.std(zero_shot_logits(x, text, center=center))
    assert np.allclose(ensemble_weights(head, x, text, center), [s * ratio for s in STEPS], rtol=1e-9)


def test_left_out_residuals_equal_refitting_without_each_class():
    rng = np.random.default_rng(1)
    text, means, ridge = rng.normal(size=(12, 20)), rng.normal(size=(12, 9)), 0.4
    tc, mc = text - text.mean(0), means - means.mean(0)
    evals, evecs = np.linalg.eigh(tc @ tc.T)
    fast = left_out_residuals(evals, evecs, mc, ridge)
    for i in range(12):
        t, m = np.delete(text, i, 0), np.delete(means, i, 0)
        tr, mr = t - t.mean(0), m - m.mean(0)
        pred = m.mean(0) + (text[i] - t.mean(0)) @ tr.T @ np.linalg.solve(tr @ tr.T + ridge * np.eye(11), mr)
        assert np.allclose(fast[i], means[i] - pred)


def test_the_prior_learns_a_map_with_a_modality_gap_and_shrinks_by_its_closed_form():
    rng = np.random.default_rng(2)
    c, d = 60, 24
    means = rng.normal(size=(c, d)) * 0.3 + 5.0  # image means around their own centroid
    gap = rng.normal(size=d) * 4  # the text side's centroid, far from it
    text = (means - 5.0) @ rng.normal(size=(d, d)) + gap  # a linear map that is not the identity
    counts = np.r_[np.full(40, 50), np.full(20, 3)]
    sigma2 = 0.01
    prior = mean_prior(means, counts, text, sigma2)
    assert prior is not None and prior.rich == 40
    # The prior explains most of the spread of the classes it never saw as rich (the text is
    # put on the sphere first, which bends the map a little).
    err_tail = np.square(prior.means[40:] - means[40:]).mean()
    assert err_tail < 0.3 * np.square(means[40:] - means[40:].mean(0)).mean()
    # Shrinkage: (n mean + k prior) / (n + k), k = sigma^2 / max(tau^2, d_c).
    observed = means + rng.normal(size=means.shape) * np.sqrt(sigma2 / counts)[:, None]
    k = sigma2 / np.maximum(prior.tau2, np.square(observed - prior.means).mean(1) - sigma2 / counts)
    want = (counts[:, None] * observed + k[:, None] * prior.means) / (counts[:, None] + k[:, None])
    assert np.allclose(prior.shrink(observed, counts), want)
    # A name that points at another class is trusted less than one that does not.
    moved = observed.copy()
    moved[45] = observed[10]
    ks = prior.strengths(moved, counts)
    assert ks[45] < 0.2 * np.median(ks[40:])


def test_names_that_say_nothing_give_no_prior():
    rng = np.random.default_rng(3)
    means, counts = rng.normal(size=(50, 16)), np.r_[np.full(30, 60), np.full(20, 4)]
    assert mean_prior(means, counts, rng.normal(size=(50, 32)), 0.01) is None
    assert mean_prior(means[:10], np.full(10, 5), rng.normal(size=(10, 32)), 0.01) is None  # too few rich classes


@pytest.fixture(scope="module", params=["clip_like", "heavy_tailed"])
def with_text(request):
    """A small long tail with its val and test splits, and both text views of its classes."""
    counts = [300] * 16 + [40] * 16 + [4] * 32
    spec = LatentSpec(dim=128, seed=1, classes_per_group=4)
    (x, y, s), _, scenes = generate(request.param, counts, 40, spec, splits=("val", "test"), text="scenes")
    *_, species = generate(request.param, counts, 0, spec, splits=(), text="species")
    tr, va, te = s == "train", s == "val", s == "test"
    return (x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]), scenes, species


def test_class_text_lifts_the_tail_and_useless_names_change_little(with_text):
    train, val, (xt, yt), scenes, species = with_text
    few = yt >= 32
    plain = LongTailHead().fit(*train, *val)
    text = LongTailHead().fit(*train, *val, class_text=scenes)
    noise = LongTailHead().fit(*train, *val, class_text=species)
    acc = lambda e, m=slice(None): float((e.predict(xt[m]) == yt[m]).mean())  # noqa: E731
    assert acc(text) > acc(plain) + 0.02 and acc(text, few) > acc(plain, few) + 0.04
    assert text.fit_info_["text_prior"] == "on" and text.fit_info_["text_ensemble_weight"] > 0
    assert noise.fit_info_["text_prior"].startswith("off: the names do not predict")
    assert abs(acc(noise) - acc(plain)) <= 0.01
    # A mapping label -> vector is the same as rows in the order of classes_.
    by_label = LongTailHead().fit(*train, *val, class_text={c: scenes[c] for c in range(64)})
    assert np.array_equal(by_label.artifact_.weight, text.artifact_.weight)


def test_class_text_of_the_wrong_shape_is_refused_in_one_line(with_text):
    (x, y), *_, scenes, _ = with_text
    with pytest.raises(ValueError, match=r"class_text has shape \(63, 128\); expected \(64, 128\)"):
        LongTailHead(epochs=1).fit(x, y, class_text=scenes[:63])
    with pytest.raises(ValueError, match="class_text has no vector for class 5"):
        LongTailHead(epochs=1).fit(x, y, class_text={c: scenes[c] for c in range(64) if c != 5})
    # Without val rows its weight is chosen on a holdout of the train rows; without those
    # either, the ensemble is off, and says so.
    head = LongTailHead(epochs=1).fit(x, y, class_text=scenes)
    assert head.fit_info_["text_ensemble"] == "holdout" and head.fit_info_["text_ensemble_weight"] >= 0
    head = LongTailHead(epochs=1, holdout=0).fit(x, y, class_text=scenes)
    assert head.fit_info_["text_ensemble"] == "off: no val rows to choose its weight on"
