"""Head training (pure core, torch): one epoch over real batches mixed with synthetic ones.

Input: an iterator of real (embeddings [B, D], labels [B]) batches, this worker's synthetic
labels for the epoch and a sampler. Each real batch is joined by the next slice of synthetic
labels, drawn on the spot, so synthetic embeddings are spread evenly over the epoch and
never materialised; whatever is left after the last real batch forms synthetic-only batches.
`HeadRecipe` (raylt.head.recipe) drives it, in this process or in each Ray Train worker
(raylt.head.fit_ray) over the rows that worker read once (a `RowSource`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from raylt.config import TrainConfig
from raylt.latent.sampling import GaussianSampler, worker_labels
from raylt.ops.optim import adamw_cosine, epoch_generator
from raylt.ops.precision import autocast, resolve


@dataclass(frozen=True)
class EpochStats:
    loss: float
    real: int
    synthetic: int
    steps: int
    precision: str = "fp32"  # of the head's matrix products (raylt.ops.precision)


def make_optimizer(head: nn.Module, cfg: TrainConfig):
    """The head's AdamW and per-epoch cosine schedule, from the train config."""
    return adamw_cosine(head.parameters(), cfg.lr, cfg.weight_decay, cfg.epochs)


def _mixed(real: Iterable, syn: torch.Tensor, per_batch: int, batch_size: int) -> Iterator:
    """(x, y, synthetic labels) per step: real batches first, each with a synthetic slice."""
    pos = 0
    for x, y in real:
        take = syn[pos : pos + per_batch]
        pos += len(take)
        yield x, y, take
    for s in range(pos, len(syn), batch_size):
        yield None, None, syn[s : s + batch_size]


def run_epoch(
    head: nn.Module,
    loss_fn: Callable,
    opt: torch.optim.Optimizer,
    real: Iterable[tuple[torch.Tensor, torch.Tensor]],
    sampler: GaussianSampler | None,
    syn_labels: np.ndarray,
    expected_batches: int,
    batch_size: int,
    generator: torch.Generator,
    precision: str = "fp32",
) -> EpochStats:
    """One epoch of steps; `precision` a resolved raylt.ops.precision setting for the head's
    forward (its logits and loss stay float32)."""
    head.train()
    device = next(head.parameters()).device
    syn = torch.as_tensor(syn_labels if sampler is not None else np.zeros(0, np.int64), device=device)
    per_batch = math.ceil(len(syn) / max(expected_batches, 1))
    total, n_real, n_syn, steps = 0.0, 0, 0, 0
    for x, y, lab in _mixed(real, syn, per_batch, batch_size):
        parts_x, parts_y = ([x], [y]) if x is not None else ([], [])
        if len(lab):
            parts_x.append(sampler.sample(lab, generator))
            parts_y.append(lab)
        if not parts_x:
            continue
        bx, by = torch.cat(parts_x).to(device, torch.float32), torch.cat(parts_y).to(device)
        with autocast(device, precision):
            logits = head(bx)
        loss = loss_fn(logits.float(), by)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(by)
        n_real += 0 if x is None else len(x)
        n_syn += len(lab)
        steps += 1
    return EpochStats(total / max(n_real + n_syn, 1), n_real, n_syn, steps, precision)


def train_epochs(head, loss_fn, opt, sched, x: torch.Tensor, y: torch.Tensor, sampler, syn_counts: np.ndarray,
                 seed: int, cfg: TrainConfig, epochs: range, rank: int = 0, world: int = 1,
                 steps: int | list[int] | None = None, keep: torch.Tensor | None = None, every: int = 0):
    """Yields (epoch, EpochStats) after each epoch: real rows shuffled in memory, this rank's
    share of the synthetic labels, one generator per (seed, epoch, rank) for both.

    `steps` real batches per epoch (default: rows / batch size): with DDP every rank must
    take the same number of steps, so the adapter passes one count for all ranks, whose
    shards may differ by a row. With selection, `keep` is a bit mask per row (bit r: the row
    is in selection round r), round r = epoch // every covers `every` epochs, and `steps` is a
    list with one count per round.
    """
    precision = resolve(cfg.precision, x.device)
    for epoch in epochs:
        r = epoch // every if (keep is not None and every) else 0
        xs, ys = (x, y) if keep is None else _round_rows(x, y, keep, r)
        n_steps = steps[r] if isinstance(steps, (list, tuple)) else steps
        expected = n_steps or math.ceil(len(ys) / cfg.batch_size)
        gen = epoch_generator(seed, epoch, rank, x.device)
        order = torch.randperm(len(ys), device=x.device, generator=gen)
        batches = ((xs[i], ys[i]) for i in order.tensor_split(expected))
        labels = worker_labels(syn_counts, seed, epoch, rank, world)
        st = run_epoch(head, loss_fn, opt, batches, sampler, labels, expected, cfg.batch_size, gen, precision)
        sched.step()
        yield epoch, st


def _round_rows(x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, r: int):
    rows = ((keep >> r) & 1).bool()
    return x[rows], y[rows]
