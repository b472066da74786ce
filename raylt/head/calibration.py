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

from raylt.head.posthoc import row_blocks

BINS = 15
_LOG_T = (-3.0, 3.0)  # T searched in [e^-3, e^3]




def mean_nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    """The mean negative log-likelihood of softmax(logits / t) at labels y."""
    total = 0.0
    for b in row_blocks(len(y)):
        z = np.asarray(logits[b], dtype=np.float64) / t
        z -= z.max(1, keepdims=True)
        total += float((np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), y[b]]).sum())
    return total / max(len(y), 1)


def _derivatives(logits: np.ndarray, y: np.ndarray, beta: float) -> tuple[float, float]:
    """First and second derivative in beta = 1 / T of the mean NLL of softmax(beta z): the
    softmax mean of z minus z_y, and the softmax variance of z (so the NLL is convex in beta)."""
    g = h = 0.0
    for b in row_blocks(len(y)):
        z = np.asarray(logits[b], dtype=np.float64)
        p = np.exp(beta * (z - z.max(1, keepdims=True)))
        p /= p.sum(1, keepdims=True)
        mean = np.einsum("nc,nc->n", p, z)
        var = np.einsum("nc,nc->n", p, z * z) - mean * mean
        g += float((mean - z[np.arange(len(z)), y[b]]).sum())
        h += float(np.clip(var, 0, None).sum())
    n = max(len(y), 1)
    return g / n, h / n


def fit_temperature(logits: np.ndarray, y: np.ndarray, steps: int = 40, tol: float = 1e-6) -> float:
    """The T minimising the mean NLL of softmax(logits / T) over (logits, y), searched in
    [e^-3, e^3]: safeguarded Newton steps in beta = 1 / T, in which the NLL is convex. The
    bracket [lo, hi] always holds the minimum (the sign of the first derivative says which
    side it is on); a Newton step that leaves it is replaced by bisection. About 6 softmax
    passes where a golden-section search over log T took 40."""
    lo, hi = np.exp(-_LOG_T[1]), np.exp(-_LOG_T[0])
    beta = 1.0
    for _ in range(steps):
        g, h = _derivatives(logits, y, beta)
        if g > 0:
            hi = beta
        else:
            lo = beta
        step = beta - g / h if h > 0 else np.nan
        nxt = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(nxt - beta) <= tol * beta or hi - lo <= tol * lo:
            beta = nxt
            break
        beta = nxt
    return float(1.0 / np.clip(beta, np.exp(-_LOG_T[1]), np.exp(-_LOG_T[0])))


def confidences(logits: np.ndarray, t: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(the largest probability of softmax(logits / t) [N], its class [N]), without the N x C
    probability matrix."""
    conf, pred = np.empty(len(logits)), np.empty(len(logits), np.int64)
    for b in row_blocks(len(logits)):
        z = np.asarray(logits[b], dtype=np.float64) / t
        pred[b] = z.argmax(1)
        conf[b] = 1.0 / np.exp(z - z[np.arange(len(z)), pred[b]][:, None]).sum(1)
    return conf, pred


def expected_calibration_error(logits: np.ndarray, y: np.ndarray, t: float = 1.0, bins: int = BINS) -> float:
    """sum over confidence bins of |accuracy - mean confidence| x the bin's share of rows, for
    the probabilities softmax(logits / t)."""
    if not len(y):
        return float("nan")
    conf, pred = confidences(logits, t)
    hit = (pred == y).astype(np.float64)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    n = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, hit, bins) - np.bincount(which, conf, bins))
    return float(gap.sum() / len(y)) if n.any() else float("nan")
