"""Ray Train adapter of the head stage: each worker runs `HeadRecipe`'s `start` and
`run_epochs` (raylt.head.recipe) on its rows.

Input: a `HeadJob` (built by `head_job` only): the estimator's parameters, its `HeadPlan`, one
`RowSource` of real train embeddings per worker (raylt.head.rows) and optionally the val
split's (read and scored by rank 0). Output: the head's state dict, from the last checkpoint;
the driver turns it into the served head with `HeadRecipe.finish`.

With `train.num_workers: auto` (the default) a fit on one node runs in Ray Train's local mode,
in the driver's process, without a worker group to start; more workers, or a multi-node
cluster, get a real worker group with DDP (raylt.ops.trainer).

Checkpoints (raylt.ops.trainer): rank 0 saves head, optimizer, schedule and epoch every
epoch; every worker reports each epoch. Re-running with the same output folder resumes from
the last checkpoint; a checkpoint of a different config (raylt.preflight's `fit_key`) is refused rather than
silently continued. Per-epoch metrics go to MLflow from rank 0, into the driver's run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from raylt.head.recipe import HeadPlan, HeadRecipe
from raylt.ops.console import live, worker_line
from raylt.ops.trainer import (RowSource, TrainerRun, load_rows, prepare, quiet_ray, report, resolve_workers, resume,
                               run_trainer, worker_context)
from raylt.preflight import fit_key
from raylt.tracking import log_epoch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadJob:
    """What the driver hands every worker of the head stage."""

    params: dict  # HeadRecipe's parameters
    plan: HeadPlan  # its Gaussians an object ref for a worker group
    train: tuple[RowSource, ...]  # one per rank
    steps: int | tuple[int, ...]  # real batches per epoch (per selection round), equal on every rank
    val: RowSource | None  # scored by rank 0 after every epoch
    tracking: dict | None  # raylt.tracking.worker_target of the driver's run
    log_levels: dict  # the driver's levels of Ray Train's and Ray Data's loggers
    progress_every: float  # seconds between progress lines (0: every epoch, for a live bar)


def head_job(est: HeadRecipe, plan: HeadPlan, train: list[RowSource], steps, val: RowSource | None,
             tracking: dict | None, workers: int) -> HeadJob:
    """The job of `workers` Ray Train workers (0: local mode). A worker group reads the
    Gaussians from the object store, once per node; local mode uses the driver's copy."""
    import ray

    g = plan.gaussians
    if workers and g is not None:
        plan = dataclasses.replace(plan, gaussians=ray.put(g))
    return HeadJob(est.get_params(), plan, tuple(train), tuple(steps) if isinstance(steps, list) else steps, val,
                   tracking, {n: logging.getLogger(n).getEffectiveLevel() for n in ("ray.train", "ray.data")},
                   0.0 if live() else 5.0)


def _evaluate_val(head, val: tuple[torch.Tensor, torch.Tensor], num_targets: int) -> float:
    """Top-1 on the val split over the target classes (auxiliary rows are not predicted)."""
    x, y = val
    with torch.no_grad():
        head.eval()
        hits = sum(int((head(x[s : s + 8192])[:, :num_targets].argmax(1) == y[s : s + 8192]).sum())
                   for s in range(0, len(y), 8192))
    return hits / max(len(y), 1)


def train_loop(job: HeadJob, run: TrainerRun) -> None:
    """The per-worker loop (Ray Train; in the driver in local mode)."""
    import ray

    quiet_ray(job.log_levels)
    rank, world, device = worker_context(run)
    est = HeadRecipe(**job.params)
    g = job.plan.gaussians
    training = est.start(job.plan, device, gaussians=ray.get(g) if isinstance(g, ray.ObjectRef) else g)
    stepped, plain = prepare(training.module, run, device)
    start = resume(plain, training.opt, training.sched, run)
    if start >= est.epochs:
        return  # finished earlier: the result is its last checkpoint
    # Rank 0 scores the val split every epoch: read once, like the train rows.
    val = load_rows(job.val, device)[:2] if job.val is not None and rank == 0 else None
    target = job.tracking if rank == 0 else None
    x, y, keep = load_rows(job.train[rank], device)
    shown = 0.0
    for epoch, st in est.run_epochs(training, job.plan, x, y, range(start, est.epochs), rank, world, job.steps, keep,
                                    module=stepped):
        metrics = {"epoch": epoch, "train_loss": st.loss, "train_real": st.real, "train_synthetic": st.synthetic,
                   "train_matmul_bits": 32 if st.precision == "fp32" else 16}
        if val is not None:
            metrics["val_top1"] = _evaluate_val(plain, val, job.plan.num_targets)
        report(plain, training.opt, training.sched, epoch, metrics, rank, run)
        target = log_epoch(target, metrics, epoch)
        if rank == 0:
            shown = _progress(epoch, est.epochs, metrics, shown, job.progress_every)


def _progress(epoch: int, epochs: int, metrics: dict, shown: float, every: float = 5.0) -> float:
    """Rank 0's progress line (forwarded to the driver's console by Ray): the first and last
    epoch, and one at most every `every` seconds between (every epoch when the driver draws
    them as a bar, raylt.ops.console); returns when it last printed."""
    now = time.monotonic()
    if epoch in (0, epochs - 1) or now - shown >= every:
        val = f", val top-1 {metrics['val_top1']:.4f}" if "val_top1" in metrics else ""
        worker_line(f"epoch {epoch + 1}/{epochs}: train loss {metrics['train_loss']:.4f}{val}")
        return now
    return shown


def fit_ray(cfg, job: HeadJob, storage: Path) -> dict:
    """Run the head trainer to completion (or resume it); the head's final state dict."""
    return run_trainer(train_loop, job, cfg.train, storage, "train", fit_key(cfg), cfg.train.epochs)["model"]


def workers_of(cfg) -> int:
    """The train workers a fit of `cfg` runs (0: local mode)."""
    return resolve_workers(cfg.train.num_workers)

