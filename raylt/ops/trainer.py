"""The TorchTrainer harness every Ray Train stage shares (the head, the BNS adapter).

A stage gives `run_trainer` its per-worker loop; the harness sets each worker's torch threads,
refuses a folder that holds checkpoints of another config, turns Ray Train's Ctrl-C exit into a
KeyboardInterrupt, and hands back the last checkpoint's state. Inside a loop, `read_shard`
pulls a Ray Data shard into memory once, `resume` restarts from the checkpoint Ray Train
hands back, and `report` sends every epoch's metrics, rank 0's with a checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

# Ray Train V2 workers hand each report to the controller through a queue of one, which the
# controller empties once per health check (2 s by default): every epoch's report would wait
# up to 2 s. Set when this module is imported, before any trainer starts; Ray propagates
# it from the driver to the controller. A user's own value wins.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")

import ray.train  # noqa: E402
import torch  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from raylt.errors import RayltError  # noqa: E402
from raylt.ops.cluster import worker_threads  # noqa: E402


def quiet_ray(levels: dict[str, int]) -> None:
    """Ray's worker loggers at the driver's levels; Ray Train V2 names the one that logs every
    report by its file path, outside `ray.train`."""
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    context = sys.modules.get("ray.train.v2._internal.execution.context")
    if context is not None and "ray.train" in levels:
        logging.getLogger(context.__file__).setLevel(levels["ray.train"])


def read_shard(shard, device, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
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


def resume(module, opt, sched, key: str) -> int:
    """The first epoch to train: 0, or the one after the checkpoint Ray Train hands back (a
    restarted worker or a re-run), whose module, optimiser and schedule state are loaded."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    if state["key"] != key:
        raise RayltError("the run's checkpoints were made with a different config; use another `name` or output dir")
    module.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    return int(state["epoch"]) + 1


def report(module, opt, sched, epoch: int, key: str, metrics: dict, rank: int) -> None:
    """One epoch's report from every rank, with rank 0's checkpoint (module, optimiser,
    schedule, epoch and config key): Ray Train needs the same number of reports from all."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        state = {"model": module.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                 "epoch": epoch, "key": key}
        torch.save(state, Path(d) / "state.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def previous_key(run_dir: Path) -> str | None:
    """The config key of the newest checkpoint of an earlier run in this folder, if any."""
    states = sorted(run_dir.glob("checkpoint_*/state.pt"), key=lambda p: p.stat().st_mtime)
    if not states:
        return None
    return torch.load(states[-1], map_location="cpu", weights_only=True)["key"]


def with_threads(loop):
    """`loop` run after setting the worker's torch threads (`raylt.ops.cluster.worker_threads`):
    every trainer's workers get them, whatever their loop."""

    def run(config: dict) -> None:
        local = ray.train.get_context().get_local_world_size()
        torch.set_num_threads(worker_threads(config["cfg"].train.threads_per_worker, local))
        loop(config)

    return run


def fit_interruptible(trainer):
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

    previous = previous_key(storage / name)
    if previous not in (None, key):
        raise RayltError(
            f"{storage} holds checkpoints of a different config; pass another `name` (or --out) to start a new run"
        )
    trainer = TorchTrainer(
        with_threads(loop),
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
    result = fit_interruptible(trainer)
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    if state["key"] != key:
        raise RayltError(f"{storage} holds a finished run of a different config; use another `name` or output dir")
    return state
