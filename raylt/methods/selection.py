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

import math
from dataclasses import dataclass

import numpy as np

from raylt.choices import SELECTORS  # declared there: names, help, this module
from raylt.errors import ConfigError, RayltError
from raylt.latent.stats import class_sums


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


@SELECTORS.register("none")
def select_none(x: np.ndarray, y: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    return np.arange(len(y))


@SELECTORS.register("random_cap")
def select_random_cap(x: np.ndarray, y: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = [idx if len(idx) <= k else rng.choice(idx, k, replace=False) for idx in _by_class(y)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


@SELECTORS.register("ip_dpp")
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
    starts = np.flatnonzero(np.diff(y[order])) + 1
    return [g for g in np.split(order, starts) if len(g)]


# The rows a head trains on when a selector chooses them: one bit per selection round.
MAX_ROUNDS = 63  # rounds live in the bits of one int64 per row


@dataclass(frozen=True)
class TrainRows:
    x: np.ndarray  # [M, D] float32, shuffled
    y: np.ndarray  # [M] labels, targets 0..C-1 then auxiliary classes
    keep: np.ndarray  # [M] int64 bit mask of the selection rounds each row is in
    rounds: int

    def counts(self, num_classes: int, r: int = 0) -> np.ndarray:
        """Rows per class in round r (every round keeps min(n_c, k) rows per class)."""
        return np.bincount(self.y[(self.keep >> r) & 1 == 1], minlength=num_classes)


def num_rounds(every: int, epochs: int) -> int:
    rounds = math.ceil(epochs / every) if every else 1
    if rounds > MAX_ROUNDS:
        raise ConfigError(
            f"selection.every={every} with train.epochs={epochs} makes {rounds} selection rounds; at most"
            f" {MAX_ROUNDS}: raise selection.every"
        )
    return rounds


def train_rows(x: np.ndarray, y: np.ndarray, selector: str, k: int, rounds: int, seed: int,
               aux_x: np.ndarray | None = None, aux_y: np.ndarray | None = None) -> TrainRows:
    """Selected target rows (one bit per round) and auxiliary rows (in every round), shuffled."""
    select = SELECTORS.get(selector)
    keep = np.zeros(len(y), np.int64)
    for r in range(rounds):
        rows = select(x, y, k, seed=int(np.random.SeedSequence([seed, r]).generate_state(1)[0]))
        keep[rows] |= np.int64(1) << r
    used = keep != 0  # rows no round selected never reach the workers
    x, y, keep = x[used], y[used], keep[used]
    if aux_x is not None and len(aux_x):
        x = np.concatenate([x, aux_x.astype(np.float32, copy=False)])
        y = np.concatenate([y, aux_y])
        keep = np.concatenate([keep, np.full(len(aux_y), (1 << rounds) - 1, np.int64)])
    order = np.random.default_rng([seed, 0x5E1]).permutation(len(y))
    return TrainRows(np.ascontiguousarray(x[order]), y[order], keep[order], rounds)


def cuts(n: int, workers: int) -> list[int]:
    """Row indices where the shards of `workers` ranks start (sizes differ by at most one)."""
    return [round(n * i / workers) for i in range(workers + 1)]


def round_steps(rows: TrainRows, workers: int, batch_size: int) -> list[int]:
    """Steps per round, equal on every rank: enough batches for the largest shard, but never
    more than the smallest shard has rows (a step without a real row would be empty)."""
    if len(rows.y) < workers:
        raise RayltError(f"{len(rows.y)} train rows cannot feed {workers} train workers; lower train.num_workers")
    c = cuts(len(rows.y), workers)
    steps = []
    for r in range(rows.rounds):
        bit = ((rows.keep >> r) & 1).astype(np.int64)
        per_rank = np.add.reduceat(bit, c[:-1]) if len(bit) else np.zeros(workers, np.int64)
        if per_rank.min() == 0:
            raise RayltError(
                f"selection round {r} leaves a train worker without rows ({per_rank.tolist()} per worker);"
                " lower train.num_workers"
            )
        steps.append(int(max(1, min(math.ceil(per_rank.max() / batch_size), per_rank.min()))))
    return steps
