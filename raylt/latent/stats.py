"""Class statistics (pure core): mergeable per-class moments of embeddings, in float64.

Input: embeddings X [N, D] and labels y [N]. Output: `ClassMoments` with per-class counts
[C], means [C, D], the pooled within-class scatter [D, D] (sum over classes of
sum_i (x_i - mu_c)(x_i - mu_c)^T), and per class a root R_c [r, D] with R_c^T R_c the best
rank-r approximation of that class's scatter, r = `rank`, and the trace of each class's
scatter [C] (what the root misses is trace - |R_c|_F^2, spread along the pooled shape when
sampling; see `raylt.latent.calibrate`). The Ray reduce over embedding files is
raylt.latent.stats_ray.

Memory stays bounded for many classes: full per-class D x D matrices for 8,142 classes at
D = 768 would take 19 GB in float32; roots of rank 16 take 0.8 GB in float64.

Partial moments of disjoint shards merge exactly (counts, means, pooled scatter) with the
parallel formula of Chan, Golub and LeVeque (1979):
    n = na + nb,  delta = mu_b - mu_a,  mu = mu_a + delta nb / n,
    S = S_a + S_b + (na nb / n) delta delta^T.
Roots merge by stacking [R_a; R_b; sqrt(na nb / n) delta] (whose Gram is S) and keeping its
top-r right singular directions: exact while a class's scatter has rank <= r, and the best
rank-r approximation of the stacked Gram otherwise (as in incremental PCA).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ClassMoments:
    counts: np.ndarray  # [C] int64
    means: np.ndarray  # [C, D] float64
    pooled: np.ndarray  # [D, D] float64 within-class scatter, summed over classes
    roots: np.ndarray  # [C, r, D] float64, R_c^T R_c ~ class scatter
    traces: np.ndarray  # [C] float64, trace of each class's scatter (exact)

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def rank(self) -> int:
        return self.roots.shape[1]

    def pooled_covariance(self) -> np.ndarray:
        """Within-class covariance shared by all classes: pooled scatter / (N - classes seen)."""
        dof = int(self.counts.sum()) - int((self.counts > 0).sum())
        return self.pooled / max(dof, 1)

    def class_covariance(self, c: int) -> np.ndarray:
        """D x D covariance of class c from its root (exact while its scatter has rank <= r)."""
        r = self.roots[c]
        return r.T @ r / max(int(self.counts[c]) - 1, 1)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.counts, self.means, self.pooled, self.roots, self.traces))

    def residuals(self) -> np.ndarray:
        """[C] scatter each class's root leaves out (0 while its scatter has rank <= r)."""
        return np.clip(self.traces - np.einsum("crd,crd->c", self.roots, self.roots), 0.0, None)


def _truncate(stacked: np.ndarray, rank: int, exact: bool = False) -> np.ndarray:
    """[k, D] -> [rank, D] rows whose Gram is the best rank-`rank` approximation of stacked's.

    Small blocks (the stacked roots of a merge, small classes) go through the eigendecomposition
    of the smaller Gram matrix (k x k or D x D), which is exact. Larger blocks go through a
    randomized range finder (`_range_root`): at Places-LT size the per-class eigh took 60% of the
    statistics. `exact` forces the eigendecomposition.
    """
    k, d = stacked.shape
    out = np.zeros((rank, d))
    if not stacked.any():
        return out
    if not exact and min(k, d) > _RANDOMIZED_ABOVE * (rank + _OVERSAMPLE):
        return _range_root(stacked, rank)
    if k <= d:
        w, u = np.linalg.eigh(stacked @ stacked.T)  # stacked = U S V^T, so U^T stacked = S V^T
        top = np.argsort(w)[::-1][: min(rank, k)]
        out[: len(top)] = u[:, top].T @ stacked
    else:
        w, v = np.linalg.eigh(stacked.T @ stacked)
        top = np.argsort(w)[::-1][:rank]
        out[: len(top)] = np.sqrt(np.clip(w[top], 0, None))[:, None] * v[:, top].T
    return out


_OVERSAMPLE = 10  # extra probe directions of the range finder
_POWER = 1  # subspace iterations: 1 keeps 0.97-0.98 of the optimal rank-16 energy on structured embeddings at 2/3 of the time of 2 (0.99); the rest goes to the pooled term (docs/BENCHMARKS.md)
_PROBE_SEED = 0x5EED
_RANDOMIZED_ABOVE = 3  # blocks with both sides above 3 (rank + oversample) take the range finder


def _range_root(a: np.ndarray, rank: int) -> np.ndarray:
    """The top-`rank` right singular rows S V^T of `a` [k, D] by randomized subspace iteration
    (Halko, Martinsson and Tropp 2011, algorithm 4.4): exact while `a` has rank at most
    rank + oversample, and otherwise converging to the leading directions with each power step.
    The probe is seeded, so a class's root does not depend on anything but its rows."""
    probe = np.random.default_rng(_PROBE_SEED).standard_normal((a.shape[1], rank + _OVERSAMPLE))
    q = np.linalg.qr(a @ probe)[0]
    for _ in range(_POWER):
        q = np.linalg.qr(a @ np.linalg.qr(a.T @ q)[0])[0]
    _, s, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    return s[:rank, None] * vt[:rank]


def class_sums(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, D] float64 sum of each class's rows: one sort, one reduceat (np.add.at is an order
    of magnitude slower on large inputs)."""
    y = np.asarray(y, dtype=np.int64)
    sums = np.zeros((num_classes, np.shape(x)[1]))
    if len(y):
        order = np.argsort(y, kind="stable")
        present, starts = np.unique(y[order], return_index=True)
        sums[present] = np.add.reduceat(np.asarray(x, dtype=np.float64)[order], starts, axis=0)
    return sums


_CHUNK_ROWS = 8192  # rows per float64 block of class_moments


def class_moments(x: np.ndarray, y: np.ndarray, num_classes: int, rank: int = 16,
                  exact_roots: bool = False) -> ClassMoments:
    """Moments of one shard: rows sorted by class once, then taken in blocks of whole classes
    of about `_CHUNK_ROWS` rows (a larger class is a block of its own), each cast to float64,
    centred class by class in place (each class's mean, trace and root from its slice), and
    added to the pooled scatter in one product.

    Blocks instead of one float64 copy of the shard: the copy was 2.7 GB at iNaturalist size,
    and at Places-LT size its first touch cost more than the arithmetic. Roots of large classes
    come from the range finder unless `exact_roots` (`_truncate`)."""
    y = np.asarray(y, dtype=np.int64)
    x = np.asarray(x)
    order = np.argsort(y, kind="stable")
    counts = np.bincount(y, minlength=num_classes).astype(np.int64)
    ends = np.cumsum(counts)
    d = x.shape[1]
    means, traces = np.zeros((num_classes, d)), np.zeros(num_classes)
    pooled, roots = np.zeros((d, d)), np.zeros((num_classes, rank, d))
    lo = 0  # first class of the block
    while lo < num_classes:
        hi = max(int(np.searchsorted(ends, ends[lo] - counts[lo] + _CHUNK_ROWS, side="right")), lo + 1)
        first, last = int(ends[lo] - counts[lo]), int(ends[hi - 1])
        if last > first:
            xs = x[order[first:last]].astype(np.float64)  # sorted by class within the block
            at = 0
            for c in range(lo, hi):
                if counts[c]:
                    seg = xs[at : at + counts[c]]  # a view: centred in place
                    means[c] = seg.mean(0)
                    seg -= means[c]
                    traces[c] = np.einsum("nd,nd->", seg, seg)
                    if counts[c] > 1:
                        roots[c] = _truncate(seg, rank, exact_roots)
                    at += counts[c]
            pooled += xs.T @ xs
        lo = hi
    return ClassMoments(counts, means, pooled, roots, traces)


def merge(a: ClassMoments, b: ClassMoments, into_a: bool = False) -> ClassMoments:
    """Moments of the union of two disjoint shards (Chan et al. 1979), float64. `into_a`
    writes the roots into a's array instead of a copy (C x r x D: 0.8 GB at iNaturalist
    size), for a running total that nothing else holds."""
    if a.means.shape != b.means.shape or a.rank != b.rank:
        raise ValueError(f"cannot merge moments of shapes {a.roots.shape} and {b.roots.shape}")
    n = a.counts + b.counts
    safe = np.maximum(n, 1)
    delta = b.means - a.means
    means = a.means + delta * (b.counts / safe)[:, None]
    w = a.counts * b.counts / safe  # zero where either side lacks the class
    weighted = delta * np.sqrt(w)[:, None]
    pooled = a.pooled + b.pooled + weighted.T @ weighted
    traces = a.traces + b.traces + np.einsum("cd,cd->c", weighted, weighted)
    roots = a.roots if into_a else a.roots.copy()
    both = np.flatnonzero(w > 0)
    only_b = np.flatnonzero((a.counts == 0) & (b.counts > 0))
    roots[only_b] = b.roots[only_b]
    for c in both:
        roots[c] = _truncate(np.vstack([a.roots[c], b.roots[c], weighted[c][None]]), a.rank)
    return ClassMoments(n, means, pooled, roots, traces)


def tree_reduce(items, fn):
    """Pairwise tree of `fn` over items: depth, and so rounding, grows with log(len(items)).
    Level by level it pairs items (0, 1), (2, 3), ... and passes an odd last one up.

    The items are taken one at a time (any iterable): a binary counter keeps one pending
    result per level, so log2 of the count plus one are held at once, and the levels left at
    the end fold from the right, as the odd items passed up do. `fn` may be a local merge or
    a Ray remote one (on object refs); given a generator of refs, no level's refs stay alive
    once merged, and Ray frees them.
    """
    stack: list[tuple[int, object]] = []
    for item in items:
        level = 0
        while stack and stack[-1][0] == level:
            item = fn(stack.pop()[1], item)
            level += 1
        stack.append((level, item))
    return fold_right([item for _, item in stack], fn)


def merge_all(parts: list[ClassMoments]) -> ClassMoments:
    return tree_reduce(parts, merge)


def aligned_blocks(n: int) -> list[tuple[int, int]]:
    """[0, n) as aligned power-of-two blocks, one per binary digit of n, largest first: the
    subtrees `tree_reduce` holds after n items. Its result is their merge from the right
    (`fold_right`), each block a perfect pairwise tree. The first blocks of n stay the first
    blocks of any larger count with the same leading items, which is what lets the moments of a
    grown set of files reuse those of its unchanged prefix (raylt.latent.blocks)."""
    out, lo = [], 0
    for bit in reversed(range(n.bit_length())):
        if n >> bit & 1:
            out.append((lo, lo + (1 << bit)))
            lo += 1 << bit
    return out


def block_tree(n: int, leaf, join, size: int = 1, kept=None, within=frozenset()) -> list[tuple[int, int, object, bool]]:
    """The tree `tree_reduce` forms over items [0, n), with subtrees taken from `kept` where it
    has them: for each of `aligned_blocks(n)`, (lo, hi, its value, whether it was kept); their
    `fold_right` by `join` is the result.

    A block is `kept(lo, hi)` when that gives a value; otherwise `leaf(lo, hi)` when it has at
    most `size` items and no kept block lies within it (`within`: the (lo, hi) of every kept
    block), else the `join` of its two halves, each formed the same way. `leaf` must form the
    pairwise tree over its items itself (`tree_reduce`, as a task over a group of files does).
    """
    def node(lo: int, hi: int):
        got = kept(lo, hi) if kept is not None else None
        if got is not None:
            return got, True
        if hi - lo > size or any(lo <= a and b <= hi and b - a < hi - lo for a, b in within):
            mid = (lo + hi) // 2
            return join(node(lo, mid)[0], node(mid, hi)[0]), False
        return leaf(lo, hi), False

    return [(lo, hi, *node(lo, hi)) for lo, hi in aligned_blocks(n)]


def fold_right(items: list, fn):
    """fn(items[0], fn(items[1], ... fn(items[-2], items[-1]))): how `tree_reduce` ends."""
    if not items:
        raise ValueError("no moments to merge")
    item = items[-1]
    for left in reversed(items[:-1]):
        item = fn(left, item)
    return item


# What the moments' floating-point values depend on besides the rows: cached moments made with
# other settings are not reused (raylt.latent.blocks).
ALGORITHM = {"chunk_rows": _CHUNK_ROWS, "oversample": _OVERSAMPLE, "power": _POWER,
             "randomized_above": _RANDOMIZED_ABOVE, "probe_seed": _PROBE_SEED}


# ----------------------------------------------------------------------------- artifact


# What reading a cut-short or altered moments file raises.
DAMAGED = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def save_moments(m: ClassMoments, path, class_names: list[str] | tuple[str, ...]) -> None:
    """Written to a file of this process first, then renamed: a crash never leaves a
    half-written artifact, and parallel writers of one cache never read each other's."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, counts=m.counts, means=m.means, pooled=m.pooled, roots=m.roots, traces=m.traces,
             class_names=np.asarray(class_names, dtype=str))
    os.replace(tmp, path)


def load_moments(path) -> tuple[ClassMoments, list[str]]:
    with np.load(path, allow_pickle=False) as z:  # no pickle: the artifact may come from elsewhere
        m = ClassMoments(z["counts"], z["means"], z["pooled"], z["roots"], z["traces"])
        return m, [str(n) for n in z["class_names"]]
