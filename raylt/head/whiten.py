"""The linear head's preconditioner: embeddings whitened by the pooled within-class covariance.

CLIP-like embeddings share a large common component and spread unevenly: a few directions
carry most of the within-class variance. A linear head trained by gradient steps on them is
badly conditioned and needs many epochs; on whitened inputs x' = (x - mu) T, with
T^T S T = I / D for the ridged pooled within-class covariance S, the same head converges in a
few (bench/head_fit.py). It is a change of variables, not of model: W' x' + b' is the linear
head W x + b with W = W' T^T and b = b' - W mu, so `head.npz` keeps the plain form and
serving does not change. Weight decay acts on W', which shrinks toward the shared-covariance
discriminant rather than toward small raw weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raylt.latent.stats import ClassMoments


@dataclass(frozen=True)
class Whitening:
    transform: np.ndarray  # [D, D] float32 T: x' = (x - mean) T
    mean: np.ndarray  # [D] float32, the count-weighted mean of the train embeddings
    shrinkage: float = 0.0  # rho of the covariance it whitens by

    def whitened_weights(self, w: np.ndarray) -> np.ndarray:
        """Whitened-space weights W' whose head equals the raw-space weights `w` [C, D]."""
        return np.linalg.solve(self.transform.astype(np.float64), np.asarray(w, np.float64).T).T.astype(np.float32)


def oas_shrinkage(s: np.ndarray, n: int) -> float:
    """Shrinkage toward the scaled identity of a covariance `s` estimated from `n` degrees of
    freedom: the oracle approximating shrinkage of Chen, Wiesel, Eldar and Hero (2010). Near 0
    when rows far outnumber dimensions, larger when they do not: a whitening from few rows
    would otherwise blow up the directions their scatter happens to miss."""
    p = len(s)
    tr, tr2 = float(np.trace(s)), float(np.einsum("ij,ij->", s, s))
    den = (n + 1 - 2 / p) * (tr2 - tr * tr / p)
    return 1.0 if den <= 0 else float(min(1.0, ((1 - 2 / p) * tr2 + tr * tr) / den))


def whitening(m: ClassMoments, ridge: float) -> Whitening:
    """T from the pooled within-class covariance S shrunk toward its mean eigenvalue:
    (1 - rho) S + rho tr(S)/D I with rho the larger of `ridge` and the OAS estimate."""
    s = m.pooled_covariance()
    d = len(s)
    dof = int(m.counts.sum()) - int((m.counts > 0).sum())
    rho = max(ridge, oas_shrinkage(s, max(dof, 1)))
    s = (1 - rho) * s + rho * max(float(np.trace(s)) / d, 1e-12) * np.eye(d)
    w, v = np.linalg.eigh(s)
    t = v / np.sqrt(np.clip(w, 1e-12, None) * d)  # total whitened variance 1: the learning rate keeps its scale
    total = max(int(m.counts.sum()), 1)
    mean = (m.means * m.counts[:, None]).sum(0) / total
    return Whitening(t.astype(np.float32), mean.astype(np.float32), rho)


def fold(weight: np.ndarray, bias: np.ndarray, transform: np.ndarray, mean: np.ndarray):
    """(W, b) of the raw-space linear head from whitened-space (W', b')."""
    w = weight.astype(np.float64) @ transform.astype(np.float64).T
    return w.astype(np.float32), (bias.astype(np.float64) - w @ mean.astype(np.float64)).astype(np.float32)


def head_whitening(head_cfg, moments: ClassMoments) -> Whitening | None:
    """What `build_head` needs for the configured head: its Whitening from the raw embeddings'
    moments when it is a whitened head, else None."""
    from raylt.head.modules import HEADS  # modules builds heads from a Whitening: it imports nothing from here

    return whitening(moments, head_cfg.whiten_ridge) if HEADS.get(head_cfg.name).whitened else None
