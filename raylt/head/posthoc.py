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

_BLOCK = 256  # rows at a time: a block's copies stay in the cache (2.2-2.4x faster than 4,096 rows)
# Classes with fewer train rows than this keep them all: a holdout row of a class with four
# would take a quarter of what its mean is estimated from.
HOLDOUT_MIN = 5
TAUS = (0.0,) + tuple(float(2 ** (k / 2)) for k in range(-4, 15))  # 0, then 0.25 .. 128 by sqrt(2)


def row_blocks(n: int):
    """Slices of `_BLOCK` rows over n rows: what the choices and the calibration go over, so
    that no N x C copy of 8,142-class logits is made."""
    return (slice(s, s + _BLOCK) for s in range(0, n, _BLOCK))


def offsets(name: str, counts: np.ndarray) -> np.ndarray | None:
    """f(n_c) per class [C], or None for `none`."""
    f = ADJUSTMENTS.get(name)
    return None if f is None else np.asarray(f(np.asarray(counts, dtype=np.float64)), dtype=np.float64)


def balanced_accuracy(pred: np.ndarray, y: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in y."""
    hits = np.bincount(y, weights=(pred == y).astype(np.float64), minlength=num_classes)
    return balanced(hits, np.bincount(y, minlength=num_classes))


def choose_tau(logits: np.ndarray, y: np.ndarray, f: np.ndarray, taus=TAUS) -> tuple[float, dict[float, float]]:
    """(tau with the best balanced accuracy of argmax(logits + tau f), score of every tau)."""
    hits = np.zeros((len(taus), logits.shape[1]))
    for b in row_blocks(len(y)):
        tau_hits(logits[b], y[b], f, taus, hits)
    return best_tau(hits, y, taus)


def tau_hits(logits: np.ndarray, y: np.ndarray, f: np.ndarray | None, taus, out: np.ndarray) -> None:
    """Add to `out` [T, C] the rows of each class that argmax(logits + tau f) gets right, for
    every tau of `taus`, `logits` [B, C] a block of rows (f None: tau is not used), in float32.
    One block is shifted by every tau while it is in the cache, into one buffer: 8,142-class
    logits of a whole holdout would be gigabytes per copy."""
    buf = np.empty(logits.shape, np.float32)  # half the float64 traffic: 2.2x faster, the same argmax but near-ties
    for i, t in enumerate(taus):
        if f is not None:
            np.add(logits, (t * f).astype(np.float32), out=buf, casting="unsafe")
        pred = (logits if f is None else buf).argmax(1)
        out[i] += np.bincount(y, weights=pred == y, minlength=out.shape[1])


def best_tau(hits: np.ndarray, y: np.ndarray, taus) -> tuple[float, dict[float, float]]:
    """(the smallest tau of the best balanced accuracy, the score of every tau) from `tau_hits`' table."""
    seen = np.bincount(y, minlength=hits.shape[1])
    scores = {t: balanced(h, seen) for t, h in zip(taus, hits)}
    best = max(scores.values())
    return min(t for t, s in scores.items() if s == best), scores


def balanced(hits: np.ndarray, seen: np.ndarray) -> float:
    """Mean recall over the classes with rows (`seen` > 0), from right rows per class."""
    return float((hits[seen > 0] / seen[seen > 0]).mean()) if seen.any() else float("nan")


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
