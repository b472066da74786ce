"""Ray Train adapter of the head stage: `TorchTrainer` workers run `raylt.train.run_epoch`.

Input: a Ray dataset of real train embeddings (split by rows across workers), optionally a val
dataset (whole on every worker, scored by rank 0), the calibrated `Gaussians` (an object
ref) and the config. Output: the head's state dict, from the last checkpoint.

Checkpoints: rank 0 saves head, optimizer, schedule and epoch every epoch; every worker
reports each epoch (Ray Train needs the same number of reports from all). Re-running with
the same `RunConfig(name, storage_path)` resumes from the last checkpoint; a checkpoint of
a different config is refused rather than silently continued. Per-epoch metrics go to MLflow
from rank 0, into the driver's run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from raylt.config import to_dict
from raylt.errors import RayltError
from raylt.ray_utils import worker_threads

log = logging.getLogger(__name__)


def fit_key(cfg) -> str:
    """What a checkpoint must agree with to be resumed: everything that shapes training."""
    keep = {k: to_dict(cfg)[k] for k in ("seed", "stats", "sampler", "selection", "adapter", "auxiliary", "head",
                                         "train")}
    # where and how it runs, not what it learns
    where = ("output_dir", "cpus_per_worker", "threads_per_worker", "placement_strategy", "max_failures")
    keep["train"] = {k: v for k, v in keep["train"].items() if k not in where}
    # Settings of a method that is off do not shape training: changing them keeps checkpoints.
    for section, off in (("selection", cfg.selection.name == "none"), ("adapter", cfg.adapter.name == "none"),
                         ("auxiliary", not cfg.auxiliary.embeddings)):
        if off:
            del keep[section]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


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
    import ray
    import ray.train
    import ray.train.torch

    from raylt.heads import build_head, build_loss
    from raylt.sampling import GaussianSampler
    from raylt.tracking import log_epoch
    from raylt.train import make_optimizer, train_epochs

    cfg, key = config["cfg"], config["key"]
    _quiet_ray(config.get("ray_log_levels", {}))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # same initial head on every rank
    head = build_head(cfg.head.name, config["dim"], config["num_classes"], cfg.head.scale, config["init"])
    head = ray.train.torch.prepare_model(head)
    plain = head.module if hasattr(head, "module") else head
    opt, sched = make_optimizer(head, cfg.train)
    gaussians = ray.get(config["gaussians"]) if config["gaussians"] is not None else None
    sampler = GaussianSampler(gaussians, device) if gaussians is not None else None
    syn_counts = np.asarray(config["syn_counts"])
    loss_fn = build_loss(cfg.head.loss, np.asarray(config["train_counts"]) + syn_counts, cfg.head.tau)
    if config.get("neighbours") is not None:  # auxiliary classes: the neighbour-silencing loss
        from raylt.auxiliary import silenced, silencing_mask

        loss_fn = silenced(loss_fn, silencing_mask(np.asarray(config["neighbours"], bool)))
    start = _resume(plain, opt, sched, key)
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    # Rank 0 scores the val split every epoch: read once, like the train shard (a streaming
    # execution per epoch cost seconds each).
    val = _read_shard(ray.train.get_dataset_shard("val"), device)[:2] if config["has_val"] and rank == 0 else None
    target = config["tracking"] if rank == 0 else None
    if start >= cfg.train.epochs:
        return  # finished earlier: the result is its last checkpoint
    x, y, keep = _read_shard(shard, device, config["rows"][rank])
    epochs = range(start, cfg.train.epochs)
    shown = 0.0
    for epoch, st in train_epochs(head, loss_fn, opt, sched, x, y, sampler, syn_counts, cfg.seed, cfg.train,
                                  epochs, rank, world, config["steps"], keep, cfg.selection.every):
        metrics = {"epoch": epoch, "train_loss": st.loss, "train_real": st.real, "train_synthetic": st.synthetic}
        if rank == 0 and val is not None:
            metrics["val_top1"] = _evaluate_val(plain, val, config.get("num_targets", config["num_classes"]))
        _report(plain, opt, sched, epoch, key, metrics, rank)
        target = log_epoch(target, metrics, epoch)
        if rank == 0:
            shown = _progress(epoch, cfg.train.epochs, metrics, shown)


def _quiet_ray(levels: dict[str, int]) -> None:
    """Ray's worker loggers at the driver's levels; Ray Train V2 names the one that logs every
    report by its file path, outside `ray.train`."""
    import sys

    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    context = sys.modules.get("ray.train.v2._internal.execution.context")
    if context is not None and "ray.train" in levels:
        logging.getLogger(context.__file__).setLevel(levels["ray.train"])


def _progress(epoch: int, epochs: int, metrics: dict, shown: float, every: float = 5.0) -> float:
    """Rank 0's progress line (forwarded to the driver's console by Ray): the first and last
    epoch, and one at most every `every` seconds between; returns when it last printed."""
    import time

    now = time.monotonic()
    if epoch in (0, epochs - 1) or now - shown >= every:
        val = f", val top-1 {metrics['val_top1']:.4f}" if "val_top1" in metrics else ""
        print(f"epoch {epoch + 1}/{epochs}: train loss {metrics['train_loss']:.4f}{val}", flush=True)
        return now
    return shown


def _read_shard(shard, device, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This worker's real embeddings, labels and selection bits (None without selection), read
    once from its Ray Data shard and kept in memory.

    Embeddings are small (2 KB each at D = 512): one pass over the shard, then every epoch
    shuffles in memory, instead of a new streaming execution per epoch (seconds each). With
    the shard's row count known, batches are copied into tensors of that size: collecting
    them and concatenating held the shard twice (1.3 GB more per worker at iNaturalist size).
    """
    dtypes = {"embedding": torch.float32, "label": torch.int64, "keep": torch.int64}
    batches = shard.iter_torch_batches(batch_size=65536, device=device, dtypes=dtypes)
    if rows is None:
        parts = [(b["embedding"], b["label"], b.get("keep")) for b in batches]
        if not parts:
            return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.int64, device=device), None
        xs, ys, ks = zip(*parts)
        return torch.cat(xs), torch.cat(ys), torch.cat(ks) if ks[0] is not None else None
    x = keep = None
    y = torch.empty(rows, dtype=torch.int64, device=device)
    pos = 0
    for b in batches:
        n = len(b["label"])
        if pos + n > rows:
            raise RayltError(f"a train shard holds more than the {rows} rows it was cut to")
        if x is None:
            x = torch.empty(rows, b["embedding"].shape[1], dtype=torch.float32, device=device)
            keep = torch.empty(rows, dtype=torch.int64, device=device) if "keep" in b else None
        x[pos : pos + n], y[pos : pos + n] = b["embedding"], b["label"]
        if keep is not None:
            keep[pos : pos + n] = b["keep"]
        pos += n
    if pos != rows:
        raise RayltError(f"a train shard holds {pos} rows where it was cut to {rows}")
    return x, y, keep


def _resume(head, opt, sched, key: str) -> int:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    if state["key"] != key:
        raise RayltError("the run's checkpoints were made with a different config; use another `name` or output dir")
    head.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    return int(state["epoch"]) + 1


def _report(head, opt, sched, epoch: int, key: str, metrics: dict, rank: int) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        state = {"model": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "epoch": epoch, "key": key}
        torch.save(state, Path(d) / "state.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _previous_key(run_dir: Path) -> str | None:
    """The config key of the newest checkpoint of an earlier run in this folder, if any."""
    states = sorted(run_dir.glob("checkpoint_*/state.pt"), key=lambda p: p.stat().st_mtime)
    if not states:
        return None
    return torch.load(states[-1], map_location="cpu", weights_only=True)["key"]


def _split_rows(train_ds, workers: int, batch_size: int, n: int | None = None) -> tuple[dict, int, list[int]]:
    """One dataset per rank, `train_<rank>`, of N / workers rows each (sizes differ by at most
    one), the number of steps every rank takes per epoch, and the rows of each rank.

    Ray Train's own split (`streaming_split(equal=True)`) drops up to workers - 1 rows, the
    same rows every epoch; splitting at row indices keeps them all.
    """
    from raylt.trainset import cuts

    n = train_ds.count() if n is None else n  # known from the embedding set: counting runs the read once more
    at = cuts(n, workers)
    parts = train_ds.split_at_indices(at[1:-1]) if workers > 1 else [train_ds]
    if n // workers == 0:
        raise RayltError(f"{n} train embeddings cannot feed {workers} train workers; lower train.num_workers")
    steps = max(1, min(math.ceil(math.ceil(n / workers) / batch_size), n // workers))
    return {f"train_{r}": p for r, p in enumerate(parts)}, steps, np.diff(at).tolist()


def fit_ray(cfg, train_ds, val_ds, gaussians, info: dict, storage: Path, tracking: dict | None) -> dict:
    """Run the head trainer to completion (or resume it); the head's final state dict."""
    import ray

    config = {
        "gaussians": ray.put(gaussians) if gaussians is not None else None,
        "tracking": tracking, "has_val": val_ds is not None, **info,
        # The driver's console levels for Ray Train's and Ray Data's own messages (a checkpoint
        # and a report line per epoch, a plan per read): the workers' loggers do not inherit them.
        "ray_log_levels": {n: logging.getLogger(n).getEffectiveLevel() for n in ("ray.train", "ray.data")},
    }
    if "steps" not in config:
        datasets, config["steps"], config["rows"] = _split_rows(train_ds, cfg.train.num_workers,
                                                                cfg.train.batch_size, info.get("train_rows"))
    else:  # the caller split the rows (rounds of selection)
        datasets = train_ds
    if val_ds is not None:
        datasets["val"] = val_ds
    return run_trainer(train_loop, config, datasets, cfg, storage, "train", fit_key(cfg))["model"]


def _with_threads(loop):
    """`loop` run after setting the worker's torch threads (`raylt.ray_utils.worker_threads`):
    every trainer's workers get them, whatever their loop."""

    def run(config: dict) -> None:
        import ray.train

        local = ray.train.get_context().get_local_world_size()
        torch.set_num_threads(worker_threads(config["cfg"].train.threads_per_worker, local))
        loop(config)

    return run


def _fit_interruptible(trainer):
    """`trainer.fit()`, with Ctrl-C as everywhere else: a KeyboardInterrupt.

    Ray Train's SIGINT handler aborts the run gracefully (workers stopped, checkpoints kept),
    then leaves through `sys.exit(0)`, so the caller would see a clean exit, and it stays
    installed after the fit. The exit becomes a KeyboardInterrupt and the previous handler
    comes back.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except SystemExit:
        raise KeyboardInterrupt from None
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def run_trainer(loop, config: dict, datasets: dict, cfg, storage: Path, name: str, key: str) -> dict:
    """`TorchTrainer` over `loop` with the config's scaling, checkpoints under `storage/name`;
    the state of its last checkpoint. A folder holding checkpoints of another config is refused
    before Ray Train starts, and a finished run is not trained again."""
    import ray.train
    from ray.train.torch import TorchTrainer

    # Ray Train V2 workers hand each report to the controller through a queue of one, which
    # the controller empties once per health check (2 s by default): every epoch's report
    # would wait up to 2 s. The variable is propagated from the driver to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    previous = _previous_key(storage / name)
    if previous not in (None, key):
        raise RayltError(
            f"{storage} holds checkpoints of a different config; pass another `name` (or --out) to start a new run"
        )
    trainer = TorchTrainer(
        _with_threads(loop),
        train_loop_config={**config, "cfg": cfg, "key": key},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    result = _fit_interruptible(trainer)
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    if state["key"] != key:
        raise RayltError(f"{storage} holds a finished run of a different config; use another `name` or output dir")
    return state
