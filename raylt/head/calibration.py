"""Calibrated probabilities: a temperature fitted on the val split, and the expected
calibration error (pure core, numpy).

Users threshold the served probabilities, so they should mean what they say. Temperature
scaling (Guo, Pleiss, Sun and Weinberger, ICML 2017) divides every logit by one T > 0 chosen
to minimise the val split's negative log-likelihood: the argmax, and so top-1, is unchanged.
T is folded into `head.npz` (weight and bias / T; a cosine head's scale / T), so the served
model needs nothing new. ECE: the confidence-weighted gap between confidence and accuracy
over 15 equal-width confidence bins.
"""

from __future__ import annotations

import numpy as np

BINS = 15
_LOG_T = (-3.0, 3.0)  # T searched in [e^-3, e^3]


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    z = logits / t
    z = z - z.max(1, keepdims=True)
    return float((np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, steps: int = 40) -> float:
    """The T minimising the mean NLL of softmax(logits / T) over (logits, y): golden-section
    search over log T (the NLL is convex in 1 / T, so unimodal in log T)."""
    logits = np.asarray(logits, dtype=np.float64)
    lo, hi = _LOG_T
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = _nll(logits, y, np.exp(a)), _nll(logits, y, np.exp(b))
    for _ in range(steps):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = _nll(logits, y, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = _nll(logits, y, np.exp(b))
    return float(np.exp((lo + hi) / 2))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    """sum over confidence bins of |accuracy - mean confidence| x the bin's share of rows."""
    if not len(y):
        return float("nan")
    conf, hit = probs.max(1), (probs.argmax(1) == y).astype(np.float64)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    n = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, hit, bins) - np.bincount(which, conf, bins))
    return float(gap.sum() / len(y)) if n.any() else float("nan")
