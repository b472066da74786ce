"""What the class names' text embeddings add to the head (pure core, numpy): the zero-shot
classifier, a text-informed prior of the class means, and the zero-shot ensemble folded into the
head's one `W x + b`.

Input: class text embeddings T [C, D] (CLIP's text tower over prompt templates, one row per
class, unit norm) beside the image embeddings' class statistics.

- Zero-shot: logits s T x, s = 100 (CLIP's logit scale): CLIP with no training, the floor.
- The mean prior (`mean_prior`): image class means predicted from the text by a ridge map
  learned on the classes with many images, centred on each side, since text and image
  embeddings have different centroids (the modality gap). Its error tau^2 per dimension is
  measured by leave-one-out on those classes, less their own sampling noise; a class mean is
  then shrunk toward its prediction with the empirical-Bayes weight k = sigma^2 / tau^2
  (sigma^2 the within-class variance per dimension): (n_c mean_c + k prior_c) / (n_c + k).
  Names the image side cannot use (a large tau^2) give a small k and change nothing.
- The ensemble (`fold_ensemble`): head logits + alpha s T (x - c), with c the mean of the image
  class means, is linear in x, so it is a new `W x + b` and serving does not change; alpha is
  chosen on held-out rows. Centring takes out each class's zero-shot bias s T_c c (the cosine
  of its text to the images' centre, which the modality gap makes large and uneven): on both
  generators of raylt.testing.simulate it added 0.5-1.3 points of top-1 (bench/head_fit.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ZERO_SHOT_SCALE = 100.0  # CLIP's learned logit scale, exp(logit_scale), which training clamps at 100
RIDGES = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # relative to the text Gram matrix's mean eigenvalue (smaller ones interpolate: no left-out error)
RICH = 20  # a class with this many train rows teaches the text -> image map
USEFUL = 0.8  # the text prior's error at most this share of the plain average's, or it is not used


def unit_rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def zero_shot_weights(text: np.ndarray, scale: float = ZERO_SHOT_SCALE) -> np.ndarray:
    """[C, D]: the zero-shot classifier's weights (its bias is 0)."""
    return scale * unit_rows(text)


def zero_shot_head(text: np.ndarray, scale: float = ZERO_SHOT_SCALE):
    """Zero-shot CLIP as a served head (a HeadArtifact): the floor every recipe is held to."""
    from raylt.head.artifact import HeadArtifact

    return HeadArtifact("linear", zero_shot_weights(text, scale).astype(np.float32), np.zeros(len(text), np.float32))


def zero_shot_logits(x: np.ndarray, text: np.ndarray, scale: float = ZERO_SHOT_SCALE,
                     center: np.ndarray | None = None) -> np.ndarray:
    """[N, C] zero-shot CLIP logits of embeddings x [N, D]; with `center` [D], less the logits
    of that point (each class's bias)."""
    x = np.asarray(x, np.float64)
    return (x if center is None else x - center) @ zero_shot_weights(text, scale).T


@dataclass(frozen=True)
class MeanPrior:
    """Image class means predicted from the class text, and what they are worth."""

    means: np.ndarray  # [C, D] predicted class means
    strength: float  # k = sigma^2 / tau^2: how many images the prediction is worth
    tau2: float  # its error per dimension (leave-one-out on the rich classes)
    sigma2: float  # within-class variance per dimension
    ridge: float  # of the map, relative to the text Gram matrix's mean eigenvalue
    rich: int  # classes the map was learned on

    def strengths(self, means: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """[C] k_c = sigma^2 / max(tau^2, d_c): a class whose own mean is further from its
        prediction than its sampling noise explains (d_c = |mean_c - prior_c|^2 / D - sigma^2 /
        n_c: a misleading name, one that points at another class) trusts its prediction less."""
        n = np.maximum(np.asarray(counts, np.float64), 1.0)
        d = np.square(np.asarray(means, np.float64) - self.means).mean(1) - self.sigma2 / n
        return self.sigma2 / np.maximum(self.tau2, d)

    def shrink(self, means: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """(n_c mean_c + k_c prior_c) / (n_c + k_c): each class's posterior mean."""
        n = np.asarray(counts, np.float64)[:, None]
        k = self.strengths(means, counts)[:, None]
        return (n * means + k * self.means) / (n + k)


def mean_prior(means: np.ndarray, counts: np.ndarray, text: np.ndarray, sigma2: float, rich: int = RICH,
               ridges=RIDGES) -> MeanPrior | None:
    """The text prior of class means [C, D] (train counts [C], class text [C, D'], within-class
    variance per dimension sigma2), or None with fewer than 8 classes of `rich` images or more
    (too few to learn a map from), or when the names predict the rich classes' means (left out
    one at a time) no better than `USEFUL` times the error of their plain average."""
    means, text = np.asarray(means, np.float64), unit_rows(text)
    counts = np.asarray(counts, np.int64)
    r = np.flatnonzero(counts >= rich)
    if len(r) < 8:
        return None
    t_bar, m_bar = text[r].mean(0), means[r].mean(0)
    tr, mr = text[r] - t_bar, means[r] - m_bar
    gram = tr @ tr.T  # [R, R]: the map in its dual form (kernel ridge), R << D
    evals, evecs = np.linalg.eigh(gram)
    scale = max(float(evals.mean()), 1e-12)
    best = None
    for lam in ridges:
        loo = left_out_residuals(evals, evecs, mr, lam * scale)
        err = float((np.square(loo).sum(1) / means.shape[1] - sigma2 / counts[r]).mean())
        if best is None or err < best[0]:
            best = (err, lam)
    err, lam = best
    # The names must predict the class means clearly better than the means' own average (a
    # ridge of infinity) does, or a tail class would only be pulled toward the crowd.
    plain = float((np.square(mr * len(r) / (len(r) - 1)).sum(1) / means.shape[1] - sigma2 / counts[r]).mean())
    if err > USEFUL * plain:
        return None
    alpha = evecs @ ((1.0 / (evals + lam * scale))[:, None] * (evecs.T @ mr))  # [R, D]
    prior = m_bar + (text - t_bar) @ tr.T @ alpha
    # A prior cannot be shown better than the noise of the means it was checked against: k is
    # at most the median rich class's count.
    tau2 = max(err, sigma2 / float(np.median(counts[r])), 1e-30)
    return MeanPrior(prior, float(sigma2 / tau2), tau2, float(sigma2), float(lam), len(r))


def left_out_residuals(evals: np.ndarray, evecs: np.ndarray, centred: np.ndarray, ridge: float) -> np.ndarray:
    """[R, D] each rich class's mean minus its prediction by the map (with its intercept) fitted
    on the other R - 1 classes, in closed form from one fit: residual / (1 - hat_ii), the hat
    matrix 11^T / R + G (G + ridge I)^-1 of the centred text Gram matrix G = evecs evals evecs^T;
    `centred` the rich classes' means less their average."""
    shrink = evals / (evals + ridge)
    fitted = evecs @ (shrink[:, None] * (evecs.T @ centred))
    hat = 1.0 / len(centred) + np.einsum("rk,k,rk->r", evecs, shrink, evecs)
    return (centred - fitted) / np.maximum(1 - hat, 1e-9)[:, None]


def fold_ensemble(weight: np.ndarray, bias: np.ndarray, text: np.ndarray, alpha: float,
                  scale: float = ZERO_SHOT_SCALE, center: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(W + alpha s T, b - alpha s T center): the linear head whose logits are the head's plus
    alpha times zero-shot CLIP's (centred on `center` when given), for the first len(text)
    classes (the head's targets)."""
    w, b = np.array(weight, np.float64, copy=True), np.array(bias, np.float64, copy=True)
    zs = zero_shot_weights(text, scale)
    w[: len(text)] += alpha * zs
    if center is not None:
        b[: len(text)] -= alpha * (zs @ np.asarray(center, np.float64))
    return w, b


STEPS = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # ensemble weights, in units of the logits' spread ratio


def ensemble_weights(head_logits: np.ndarray, x: np.ndarray, text: np.ndarray, center: np.ndarray | None = None,
                     steps=STEPS) -> list[float]:
    """Candidate alphas: `steps` times the ratio of the head's logit spread (the std of
    `head_logits` [N, C]) to zero-shot's on the same rows x [N, D], so that a step of 1 weighs
    both alike whatever the head's scale. Zero-shot's spread comes from the rows' first two
    moments, without its N x C logits: E[l] = mean_c w_c . m, E[l^2] = mean_c w_c' M w_c."""
    w = zero_shot_weights(text)
    d = np.asarray(x, np.float64) - (0.0 if center is None else np.asarray(center, np.float64))
    m, second = d.mean(0), d.T @ d / max(len(d), 1)
    mean, mean_sq = float(w.mean(0) @ m), float(((w @ second) * w).sum() / len(w))
    ratio = float(np.std(head_logits) / max(np.sqrt(max(mean_sq - mean * mean, 0.0)), 1e-12))
    return [s * ratio for s in steps]


def text_prior_moments(m, text: np.ndarray):
    """(class moments with the means shrunk toward their text prior, what was done for the
    metrics): `m` a raylt.latent.stats.ClassMoments of the target classes, `text` [C, D]."""
    import dataclasses

    if len(text) != m.num_classes:
        raise ValueError(f"class text has {len(text)} rows for {m.num_classes} classes")
    sigma2 = float(np.trace(m.pooled_covariance()) / m.dim)
    prior = mean_prior(m.means, m.counts, text, sigma2)
    if prior is None:
        return m, {"text_prior": f"off: the names do not predict the class means (or fewer than 8 classes have "
                                 f"{RICH} images to learn it from)"}
    k = prior.strengths(m.means, m.counts)
    shrunk = dataclasses.replace(m, means=prior.shrink(m.means, m.counts))
    return shrunk, {"text_prior": "on", "text_prior_strength": float(np.median(k)),
                    "text_prior_classes": prior.rich}
