"""Selection of real embeddings per large class (pure core, numpy): the `SELECTORS` registry.

Seed: "Long-Tailed Recognition via Information-Preservable Two-Stage Learning" (arXiv
2510.08836). `ip_dpp` keeps at most k embeddings of a class, chosen by a determinantal point
process with the kernel L = diag(q) K diag(q): K the cosine Gram of the class's embeddings
(diversity), q_i an informativeness score from an out-of-fold probe, 1 - p(true class)
(quality: the hard, boundary examples). The MAP subset is found greedily with the fast
algorithm of Chen, Zhang and Zhou, "Fast Greedy MAP Inference for Determinantal Point
Process" (NeurIPS 2018): an incremental Cholesky factor, O(n k^2) after the kernel rows,
here computed on the fly from the [n, D] features so the n x n kernel is never formed.
`random_cap` is the control (a uniform random subset of k, what the authors' released code
effectively keeps).

Input: embeddings [N, D] (L2-normalised), labels [N]. Output: indices of the rows kept.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from raylt.latent.stats import class_sums
from raylt.registry import Registry

SELECTORS: Registry[Callable[..., np.ndarray]] = Registry("selector")


def greedy_map(features: np.ndarray, k: int, eps: float = 1e-10) -> np.ndarray:
    """Greedy MAP of the DPP with kernel L = F F^T (F = [n, D] rows, e.g. q_i x_i), at most k
    items, in the order picked (Chen et al. 2018, Algorithm 1). Stops early once no item adds
    volume (the kernel's rank is reached)."""
    f = np.asarray(features, dtype=np.float64)
    n = len(f)
    k = min(k, n)
    c = np.zeros((k, n))
    d2 = np.einsum("nd,nd->n", f, f)  # diag(L): marginal gains of the empty set
    picked = []
    j = int(np.argmax(d2))
    while len(picked) < k and d2[j] > eps:
        picked.append(j)
        t = len(picked) - 1
        row = f @ f[j]  # L[j, :], one kernel row at a time
        e = (row - c[:t, j] @ c[:t]) / np.sqrt(d2[j])
        c[t] = e
        d2 = d2 - e**2
        d2[picked] = -np.inf
        j = int(np.argmax(d2))
    return np.asarray(picked, dtype=np.int64)


def informativeness(x: np.ndarray, y: np.ndarray, num_classes: int, folds: int = 5, scale: float = 20.0,
                    seed: int = 0) -> np.ndarray:
    """q_i = 1 - p(y_i | x_i) from an out-of-fold nearest-class-mean probe (cosine logits times
    `scale`): each row is scored by class means computed without its own fold."""
    rng = np.random.default_rng(seed)
    fold = rng.integers(0, folds, len(y))
    q = np.empty(len(y))
    for f in range(folds):
        held = fold == f
        if not held.any():
            continue
        sums = class_sums(x[~held], y[~held], num_classes)
        means = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        logits = scale * x[held] @ means.T
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        q[held] = 1.0 - p[np.arange(held.sum()), y[held]]
    return q


@SELECTORS.register("none", "keep every real embedding")
def select_none(x: np.ndarray, y: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    return np.arange(len(y))


@SELECTORS.register("random_cap", "at most k uniformly random embeddings per class (the control)")
def select_random_cap(x: np.ndarray, y: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = [idx if len(idx) <= k else rng.choice(idx, k, replace=False) for idx in _by_class(y)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


@SELECTORS.register("ip_dpp", "at most k per class by a quality-weighted DPP, greedy MAP (arXiv 2510.08836)")
def select_ip_dpp(x: np.ndarray, y: np.ndarray, k: int, seed: int = 0, floor: float = 0.05) -> np.ndarray:
    """Classes above k are reduced to the DPP's greedy MAP subset; `floor` keeps easy
    examples selectable (q = 0 would remove them from the kernel entirely)."""
    q = informativeness(x, y, int(y.max()) + 1 if len(y) else 0, seed=seed)
    keep = []
    for idx in _by_class(y):
        if len(idx) <= k:
            keep.append(idx)
            continue
        xc = x[idx] / np.maximum(np.linalg.norm(x[idx], axis=1, keepdims=True), 1e-12)
        chosen = greedy_map((floor + q[idx])[:, None] * xc, k)
        if len(chosen) < k:  # the kernel's rank (D) ran out: fill with the most informative rest
            rest = np.setdiff1d(np.arange(len(idx)), chosen)
            chosen = np.concatenate([chosen, rest[np.argsort(-q[idx][rest])][: k - len(chosen)]])
        keep.append(idx[chosen])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def _by_class(y: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(y, kind="stable")
    cuts = np.flatnonzero(np.diff(y[order])) + 1
    return [g for g in np.split(order, cuts) if len(g)]
