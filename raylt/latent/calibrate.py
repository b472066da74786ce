"""Per-class sampling distributions from class statistics (pure core, numpy).

Input: `ClassMoments` (raylt.latent.stats). Output: `Gaussians`, a bounded-memory description of one
Gaussian per class in which the covariance of class c is a weighted sum of low-rank class
terms, a shared pooled term and a ridge:

    Sigma_c = sum_s w[c,s]^2 Rn[src[c,s]]^T Rn[src[c,s]] + shared[c]^2 P + eps I,

Rn_j = R_j / sqrt(n_j - 1) the scaled root of class j, P the pooled within-class covariance
normalised to trace 1, the pooled term carrying the scatter the roots leave out. P is kept as
its top-k eigen-directions plus an isotropic floor (P ~ F F^T + floor I, same trace), so a
draw costs k D instead of D^2. A sample is the mean plus one independent draw per term, so no
class ever needs a D x D matrix of its own.

Two calibrations fill it:
- `calibrated_gaussians` (the default recipe, design brief section 3): shrinkage
  Sigma_c = lam_c S_c + (1 - lam_c) Sigma_nb(c) + eps I, lam_c = n_c / (n_c + kappa), with
  Sigma_nb(c) the count-weighted covariance of the k classes whose means are nearest to mu_c,
  or the pooled covariance when no neighbour has one. This is the distribution calibration of
  Yang, Liu and Xu, "Free Lunch for Few-shot Learning" (ICLR 2021), as a shrinkage estimator.
- `free_lunch_gaussians` (Yang et al. 2021 as published, on class statistics): in Tukey-
  transformed space, a class below `base_min` images takes the mean of itself and its k
  nearest base classes, and their average covariance plus alpha I; base classes keep their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raylt.latent.stats import ClassMoments


@dataclass(frozen=True)
class Gaussians:
    means: np.ndarray  # [C, D] float32
    roots: np.ndarray  # [C, r, D] float32, Rn_c = R_c / sqrt(n_c - 1)
    sources: np.ndarray  # [C, m] int64, class whose root each term uses (-1: none)
    weights: np.ndarray  # [C, m] float32, w[c, s] (square roots of mixture weights)
    shared: np.ndarray  # [C] float32, coefficient of the pooled term
    pooled_factor: np.ndarray  # [D, k] float32, P ~ F F^T + pooled_floor I (trace 1)
    pooled_floor: float  # isotropic part of P per dimension
    eps: float  # ridge variance per dimension
    valid: np.ndarray  # [C] bool, classes with at least one image (others cannot be sampled)
    transform: str = "identity"  # feature space the Gaussians live in (see raylt.latent.sampling)

    def covariance(self, c: int) -> np.ndarray:
        """The full D x D covariance of class c (for tests and small D only)."""
        d = self.means.shape[1]
        f = self.pooled_factor.astype(np.float64)
        out = self.shared[c] ** 2 * (f @ f.T + self.pooled_floor * np.eye(d)) + self.eps * np.eye(d)
        for src, w in zip(self.sources[c], self.weights[c]):
            if src >= 0:
                r = self.roots[src].astype(np.float64)
                out += w**2 * r.T @ r
        return out


def _inverse_dof(m: ClassMoments) -> np.ndarray:
    """[C] 1 / (n_c - 1), zero for classes of one image (no spread is known)."""
    dof = np.maximum(m.counts - 1, 0).astype(np.float64)
    return np.divide(1.0, dof, out=np.zeros_like(dof), where=dof > 0)


def _pooled_shape(m: ClassMoments, k: int = 64) -> tuple[np.ndarray, float, float]:
    """The pooled covariance scaled to trace 1 as (F [D, k], floor), and its trace: F holds the
    top-k eigen-directions above the floor, the floor is the mean of the other eigenvalues."""
    cov = m.pooled_covariance()
    d = cov.shape[0]
    tr = float(np.trace(cov))
    if tr <= 0:  # every class has a single image: no within-class spread is known
        return np.zeros((d, 0)), 1.0 / d, 0.0
    w, v = np.linalg.eigh(cov / tr)
    w = np.clip(w, 0, None)[::-1]
    v = v[:, ::-1]
    k = min(k, d - 1)
    floor = float(w[k:].mean())
    return v[:, :k] * np.sqrt(np.clip(w[:k] - floor, 0, None)), floor, tr


def nearest_classes(means: np.ndarray, k: int, candidates: np.ndarray, block: int = 2048) -> np.ndarray:
    """[C, k] indices of the k candidate classes whose means are nearest (Euclidean) to each
    class mean, never the class itself; -1 pads rows with fewer than k candidates.

    Blocked so that 8,142 classes need a 2,048 x C distance block at a time, not C x C.
    """
    cand = np.flatnonzero(candidates)
    c_all = len(means)
    out = np.full((c_all, k), -1, dtype=np.int64)
    if k == 0 or len(cand) == 0:
        return out
    cm = means[cand]
    cn = np.einsum("kd,kd->k", cm, cm)
    for lo in range(0, c_all, block):
        q = means[lo : lo + block]
        d2 = np.einsum("bd,bd->b", q, q)[:, None] + cn[None] - 2 * q @ cm.T
        d2[cand[None] == np.arange(lo, lo + len(q))[:, None]] = np.inf  # never a class's own
        kk = min(k, len(cand))
        part = np.argpartition(d2, kk - 1, axis=1)[:, :kk]
        order = np.take_along_axis(d2, part, 1).argsort(1)
        best = np.take_along_axis(part, order, 1)
        finite = np.isfinite(np.take_along_axis(d2, best, 1))
        out[lo : lo + len(q), :kk] = np.where(finite, cand[best], -1)
    return out


def calibrated_gaussians(m: ClassMoments, kappa: float, neighbours: int, eps: float) -> Gaussians:
    """The default recipe's shrinkage calibration (module docstring). `eps` is the ridge as a
    fraction of the mean within-class variance per dimension."""
    counts = m.counts.astype(np.float64)
    resid = m.residuals() * _inverse_dof(m)  # scatter the roots leave out, per n_c - 1
    pooled_tr = float(np.trace(m.pooled_covariance()))
    lam = np.where(counts > 1, counts / (counts + kappa), 0.0)
    nb = nearest_classes(m.means, neighbours, m.counts > 1)
    has_nb = nb >= 0
    omega = np.where(has_nb, counts[np.maximum(nb, 0)], 0.0)
    total = omega.sum(1, keepdims=True)
    omega = np.divide(omega, total, out=np.zeros_like(omega), where=total > 0)
    no_nb = total[:, 0] == 0  # fall back to the pooled covariance
    sources = np.concatenate([np.arange(len(counts))[:, None], nb], axis=1)
    weights = np.sqrt(np.concatenate([lam[:, None], (1 - lam)[:, None] * omega], axis=1))
    sources[:, 0] = np.where(counts > 1, sources[:, 0], -1)
    nb_resid = (omega * resid[np.maximum(nb, 0)]).sum(1)
    shared2 = lam * resid + (1 - lam) * np.where(no_nb, pooled_tr, nb_resid)
    return _assemble(m, m.means, sources, weights, shared2, ridge=eps)


def free_lunch_gaussians(m: ClassMoments, base_min: int, neighbours: int, alpha: float) -> Gaussians:
    """Yang et al. (2021), on statistics of Tukey-transformed embeddings (module docstring).
    `alpha` is their covariance ridge, as a fraction of the mean within-class variance per
    dimension (their 0.21 was for unnormalised ReLU features)."""
    counts = m.counts
    resid = m.residuals() * _inverse_dof(m)  # scatter the roots leave out, per n_c - 1
    pooled_tr = float(np.trace(m.pooled_covariance()))
    base = counts >= max(base_min, 2)
    nb = nearest_classes(m.means, neighbours, base)
    novel = ~base & (counts > 0) & (nb[:, 0] >= 0)
    k = (nb >= 0).sum(1)
    means = m.means.copy()
    nb_sum = np.where((nb >= 0)[..., None], m.means[np.maximum(nb, 0)], 0.0).sum(1)
    means[novel] = (nb_sum[novel] + m.means[novel]) / (k[novel, None] + 1)
    # Base classes (and classes with no base class to borrow from) keep their own statistics.
    own = np.arange(len(counts))[:, None]
    sources = np.where(novel[:, None], nb, np.concatenate([own, np.full_like(nb[:, 1:], -1)], 1))
    sources = np.where((sources >= 0) & (counts[np.maximum(sources, 0)] > 1), sources, -1)
    kk = np.maximum((sources >= 0).sum(1, keepdims=True), 1)
    weights = np.where(sources >= 0, 1.0 / np.sqrt(kk), 0.0)
    shared2 = np.where(sources >= 0, resid[np.maximum(sources, 0)], 0.0).sum(1) / kk[:, 0]
    shared2 = np.where((sources >= 0).any(1), shared2, pooled_tr)  # nothing to borrow: pooled
    return _assemble(m, means, sources, weights, shared2, ridge=alpha, transform="tukey")


def _assemble(m: ClassMoments, means, sources, weights, shared2, ridge: float, transform: str = "identity") -> Gaussians:
    """`Gaussians` in float32; `ridge` is relative to the mean within-class variance per dimension."""
    roots = m.roots * np.sqrt(_inverse_dof(m))[:, None, None]
    factor, floor, pooled_tr = _pooled_shape(m)
    return Gaussians(
        means=np.asarray(means, dtype=np.float32),
        roots=roots.astype(np.float32),
        sources=sources,
        weights=np.asarray(weights, dtype=np.float32),
        shared=np.sqrt(shared2).astype(np.float32),
        pooled_factor=factor.astype(np.float32),
        pooled_floor=floor,
        eps=float(ridge * pooled_tr / m.dim),
        valid=m.counts > 0,
        transform=transform,
    )


def save_gaussians(g: Gaussians, path) -> None:
    np.savez(path, **{f: getattr(g, f) for f in Gaussians.__dataclass_fields__})


def load_gaussians(path) -> Gaussians:
    with np.load(path, allow_pickle=False) as z:
        kw = {k: z[k] for k in z.files}
    kw["eps"], kw["pooled_floor"], kw["transform"] = float(kw["eps"]), float(kw["pooled_floor"]), str(kw["transform"])
    return Gaussians(**kw)
