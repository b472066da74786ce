"""Post-hoc per-class logit offsets, chosen on the val split (pure core, numpy).

A class mean estimated from n_c images is off by noise of covariance Sigma / n_c, and a head
fitted around it loses, in expectation, a margin that grows like 1 / n_c on that class's own
test images (for the shared-covariance Gaussian head it is D / (2 n_c) in log-likelihood
units). Adding tau * f(n_c) to each class's bias after training gives it back; tau is the one
number chosen, on the val split's balanced accuracy, from a fixed grid, smallest tau on ties.
The offsets go into `head.npz`'s bias, so the served model needs nothing new.

Without a val split, `holdout` holds out a seeded, stratified share of the train split to
choose on (raylt.head.recipe's holdout fit, `raylt tune`'s trials).

Registry `ADJUSTMENTS`: `none`; `count`, f(n) = 1 / n (default: bench/head_fit.py); `prior`,
f(n) = -log(n / N), the post-hoc logit adjustment of Menon et al. (ICLR 2021).
"""

from __future__ import annotations


import numpy as np

from raylt.choices import ADJUSTMENTS  # declared there: names, help, this module

ADJUSTMENTS.register("none")(None)
ADJUSTMENTS.register("count")(
    lambda n: 1.0 / np.maximum(n, 1))
ADJUSTMENTS.register("prior")(
    lambda n: -np.log(np.maximum(n, 1) / max(float(np.sum(n)), 1.0)))

_BLOCK = 4096  # rows at a time
# Classes with fewer train rows than this keep them all: a holdout row of a class with four
# would take a quarter of what its mean is estimated from.
HOLDOUT_MIN = 5
TAUS = (0.0,) + tuple(float(2 ** (k / 2)) for k in range(-4, 15))  # 0, then 0.25 .. 128 by sqrt(2)


def offsets(name: str, counts: np.ndarray) -> np.ndarray | None:
    """f(n_c) per class [C], or None for `none`."""
    f = ADJUSTMENTS.get(name)
    return None if f is None else np.asarray(f(np.asarray(counts, dtype=np.float64)), dtype=np.float64)


def balanced_accuracy(pred: np.ndarray, y: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in y."""
    hits = np.bincount(y, weights=(pred == y).astype(np.float64), minlength=num_classes)
    seen = np.bincount(y, minlength=num_classes)
    return float((hits[seen > 0] / seen[seen > 0]).mean()) if seen.any() else float("nan")


def choose_tau(logits: np.ndarray, y: np.ndarray, f: np.ndarray, taus=TAUS) -> tuple[float, dict[float, float]]:
    """(tau with the best balanced accuracy of argmax(logits + tau f), score of every tau).
    Row blocks of `_BLOCK`: the shifted logits of 8,142 classes would be 1.6 GB at once."""
    def pred(t):
        return np.concatenate([(logits[s : s + _BLOCK] + t * f[None]).argmax(1) for s in range(0, len(y), _BLOCK)]
                              or [np.zeros(0, np.int64)])

    scores = {t: balanced_accuracy(pred(t), y, logits.shape[1]) for t in taus}
    best = max(scores.values())
    return min(t for t, s in scores.items() if s == best), scores


def holdout(y: np.ndarray, num_classes: int, seed: int, fraction: float, min_count: int = HOLDOUT_MIN) -> np.ndarray:
    """Rows held out to choose on: `fraction` of each class with at least `min_count` rows,
    at least one (rarer classes keep every row for training), chosen with `seed`."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(y), bool)
    order = np.argsort(y, kind="stable")
    starts = np.searchsorted(y[order], np.arange(num_classes + 1))
    for c in range(num_classes):
        rows = order[starts[c]:starts[c + 1]]
        if len(rows) >= min_count and fraction > 0:
            out[rng.choice(rows, max(1, int(len(rows) * fraction)), replace=False)] = True
    return out
