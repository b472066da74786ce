"""Ray Train adapter of the head stage: `TorchTrainer` workers run `raylt.head.loop.train_epochs`.

Input: one `RowSource` of real train embeddings per worker (raylt.head.rows), optionally the
val split's (read and scored by rank 0), the calibrated `Gaussians` (an object ref) and the
config. Output: the head's state dict, from the last checkpoint.

Checkpoints (raylt.ops.trainer): rank 0 saves head, optimizer, schedule and epoch every
epoch; every worker reports each epoch. Re-running with the same output folder resumes from
the last checkpoint; a checkpoint of a different config (`fit_key`) is refused rather than
silently continued. Per-epoch metrics go to MLflow from rank 0, into the driver's run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from raylt.config import to_dict
from raylt.head.loop import make_optimizer, train_epochs
from raylt.head.modules import build_head, build_loss
from raylt.latent.sampling import GaussianSampler
from raylt.methods.auxiliary import silenced, silencing_mask
from raylt.methods.recipes import METHODS
from raylt.ops.hashing import json_key
from raylt.ops.console import live, worker_line
from raylt.ops.trainer import load_rows, quiet_ray, report, resume, run_trainer
from raylt.tracking import log_epoch

log = logging.getLogger(__name__)
# Where and how a fit runs, not what it learns: left out of the checkpoints' key.
_WHERE = ("output_dir", "cpus_per_worker", "threads_per_worker", "placement_strategy", "max_failures")
_AFTER = ("posthoc", "posthoc_tau")  # head settings applied after training (raylt.head.posthoc)


def fit_key(cfg) -> str:
    """What a checkpoint must agree with to be resumed: everything that shapes training."""
    keep = {k: to_dict(cfg)[k] for k in ("seed", "stats", "sampler", "selection", "adapter", "auxiliary", "head",
                                         "train")}
    keep["train"] = {k: v for k, v in keep["train"].items() if k not in _WHERE}
    keep["head"] = {k: v for k, v in keep["head"].items() if k not in _AFTER}
    # Settings of a method that is off do not shape training: changing them keeps checkpoints.
    for method, on in METHODS.items():
        if not on(cfg):
            del keep[method]
    return json_key(keep)


def _evaluate_val(head, val: tuple[torch.Tensor, torch.Tensor], num_targets: int) -> float:
    """Top-1 on the val split over the target classes (auxiliary rows are not predicted)."""
    x, y = val
    with torch.no_grad():
        head.eval()
        hits = sum(int((head(x[s : s + 8192])[:, :num_targets].argmax(1) == y[s : s + 8192]).sum())
                   for s in range(0, len(y), 8192))
    return hits / max(len(y), 1)


def train_loop(config: dict) -> None:
    """The per-worker loop (Ray Train)."""
    cfg, key = config["cfg"], config["key"]
    quiet_ray(config.get("ray_log_levels", {}))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # same initial head on every rank
    head = build_head(cfg.head.name, config["dim"], config["num_classes"], cfg.head.scale, config["init"],
                      config.get("whiten"))
    head = ray.train.torch.prepare_model(head)
    plain = head.module if hasattr(head, "module") else head
    opt, sched = make_optimizer(head, cfg.train)
    gaussians = ray.get(config["gaussians"]) if config["gaussians"] is not None else None
    sampler = GaussianSampler(gaussians, device) if gaussians is not None else None
    syn_counts = np.asarray(config["syn_counts"])
    loss_fn = build_loss(cfg.head.loss, np.asarray(config["train_counts"]) + syn_counts, cfg.head.tau)
    if config.get("neighbours") is not None:  # auxiliary classes: the neighbour-silencing loss
        loss_fn = silenced(loss_fn, silencing_mask(np.asarray(config["neighbours"], bool)))
    start = resume(plain, opt, sched, key)
    # Rank 0 scores the val split every epoch: read once, like the train rows.
    val = load_rows(config["val"], device)[:2] if config["val"] is not None and rank == 0 else None
    target = config["tracking"] if rank == 0 else None
    if start >= cfg.train.epochs:
        return  # finished earlier: the result is its last checkpoint
    x, y, keep = load_rows(config["train"][rank], device)
    epochs = range(start, cfg.train.epochs)
    shown = 0.0
    for epoch, st in train_epochs(head, loss_fn, opt, sched, x, y, sampler, syn_counts, cfg.seed, cfg.train,
                                  epochs, rank, world, config["steps"], keep, cfg.selection.every):
        metrics = {"epoch": epoch, "train_loss": st.loss, "train_real": st.real, "train_synthetic": st.synthetic,
                   "train_matmul_bits": 32 if st.precision == "fp32" else 16}
        if rank == 0 and val is not None:
            metrics["val_top1"] = _evaluate_val(plain, val, config.get("num_targets", config["num_classes"]))
        report(plain, opt, sched, epoch, key, metrics, rank)
        target = log_epoch(target, metrics, epoch)
        if rank == 0:
            shown = _progress(epoch, cfg.train.epochs, metrics, shown, config["progress_every"])


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


def fit_ray(cfg, train: list, val, gaussians, info: dict, storage: Path, tracking: dict | None) -> dict:
    """Run the head trainer to completion (or resume it) on one `RowSource` per worker (`train`)
    and the val split's (or None); the head's final state dict."""
    config = {
        "gaussians": ray.put(gaussians) if gaussians is not None else None,
        "tracking": tracking, "train": train, "val": val, **info,
        # The driver's console levels for Ray Train's and Ray Data's own messages (a checkpoint
        # and a report line per epoch, a plan per read): the workers' loggers do not inherit them.
        "ray_log_levels": {n: logging.getLogger(n).getEffectiveLevel() for n in ("ray.train", "ray.data")},
        "progress_every": 0.0 if live() else 5.0,
    }
    return run_trainer(train_loop, config, cfg, storage, "train", fit_key(cfg), cfg.train.epochs)["model"]
