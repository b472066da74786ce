"""The head's real training rows when they are chosen rather than streamed: a selection of the
train embeddings per round (raylt.selection), plus auxiliary-class rows (raylt.auxiliary).

Input: train embeddings [N, D] and labels [N] on the driver (selection needs a class's rows
together), optional auxiliary rows. Output: one Ray dataset per train worker, `train_<rank>`,
with columns `embedding`, `label` and `keep` (bit r set: the row is in selection round r), and
the number of steps every rank takes in each round.

Rows are shuffled once (seeded) before they are cut into worker shards, so that every rank
sees every class; a row is never dropped. Each round r uses the selector with seed
(seed, r), so `random_cap` draws a new subset and `ip_dpp` re-scores informativeness on new
probe folds; a round covers `selection.every` epochs (all of them when 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from raylt.errors import ConfigError, RayltError
from raylt.selection import SELECTORS

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


def shard_datasets(rows: TrainRows, workers: int) -> dict:
    """One Ray dataset per rank, `train_<rank>`, from the in-memory rows."""
    import pyarrow as pa
    import ray
    from ray.data.extensions import ArrowTensorArray

    c = cuts(len(rows.y), workers)
    out = {}
    for w in range(workers):
        sl = slice(c[w], c[w + 1])
        # Ray's tensor column type: workers read it as a [B, D] tensor without a conversion pass.
        table = pa.table({"embedding": ArrowTensorArray.from_numpy(rows.x[sl]), "label": rows.y[sl],
                          "keep": rows.keep[sl]})
        out[f"train_{w}"] = ray.data.from_arrow(table)
    return out
