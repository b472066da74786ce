"""The TorchTrainer harness every Ray Train stage shares (the head, the BNS adapter).

A stage gives `run_trainer` its per-worker loop; the harness sets each worker's torch threads,
refuses a folder that holds checkpoints of another config, turns Ray Train's Ctrl-C exit into a
KeyboardInterrupt, and hands back the last checkpoint's state. Inside a loop, `load_rows`
reads the worker's real rows (a `RowSource`) into memory once, `resume` restarts from the checkpoint Ray Train
hands back, and `report` sends every epoch's metrics, rank 0's with a checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

# Ray Train V2 workers hand each report to the controller through a queue of one, which the
# controller empties once per health check (2 s by default): every epoch's report would wait
# up to 2 s. Set when this module is imported, before any trainer starts; Ray propagates
# it from the driver to the controller. A user's own value wins.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")

import ray  # noqa: E402
import ray.train  # noqa: E402
import torch  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from raylt.embed.inputs import read_rows  # noqa: E402
from raylt.errors import RayltError  # noqa: E402
from raylt.ops.cluster import worker_threads  # noqa: E402

log = logging.getLogger(__name__)


def quiet_ray(levels: dict[str, int]) -> None:
    """Ray's worker loggers at the driver's levels; Ray Train V2 names the one that logs every
    report by its file path, outside `ray.train`."""
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    context = sys.modules.get("ray.train.v2._internal.execution.context")
    if context is not None and "ray.train" in levels:
        logging.getLogger(context.__file__).setLevel(levels["ray.train"])


@dataclass(frozen=True)
class RowSource:
    """Where a train worker's real rows come from: rows lo..hi of one split of Parquet files
    (counted in file order; hi None: to the end), or, for rows chosen on the driver, an object
    ref of (x, y, keep) arrays.

    A worker reads its rows with pyarrow rather than through a Ray Data shard: the rows are
    read once and then live in memory, and a Ray Data execution per split started a dataset
    manager, a split coordinator and Parquet footer readers per fit (10-15 s of a small fit on
    2 cores). The files must be readable from every node, as Ray Data's read tasks need too.
    """

    files: tuple[str, ...] = ()
    dim: int = 0
    split: str = "train"
    lo: int = 0
    hi: int | None = None
    ref: object = None

    def rows(self) -> int | None:
        return None if self.hi is None else self.hi - self.lo


def load_rows(src: RowSource, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This worker's real embeddings, labels and selection bits (None without selection), read
    once and kept in memory on `device`: every epoch shuffles them there."""
    if src.ref is not None:
        x, y, keep = ray.get(src.ref)  # read-only views on the object store: torch copies them
        copy = True
    else:  # arrays of our own, shaped to the shard: wrapped, not copied (1.3 GB at iNaturalist size)
        (x, y), keep, copy = read_rows(src.files, src.dim, src.split, src.lo, src.hi), None, False
    if src.rows() is not None and len(y) != src.rows():
        raise RayltError(f"a train shard holds {len(y)} rows where it was cut to {src.rows()}")

    def as_tensor(a):
        return (torch.tensor(a) if copy else torch.from_numpy(a)).to(device)

    return as_tensor(x), as_tensor(y), as_tensor(keep) if keep is not None else None


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


def newest_state(run_dir: Path) -> dict | None:
    """The state of the newest checkpoint of an earlier run in this folder, if any."""
    states = sorted(run_dir.glob("checkpoint_*/state.pt"), key=lambda p: p.stat().st_mtime)
    if not states:
        return None
    return torch.load(states[-1], map_location="cpu", weights_only=True)


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


def run_trainer(loop, config: dict, cfg, storage: Path, name: str, key: str, epochs: int) -> dict:
    """`TorchTrainer` over `loop` with the config's scaling, checkpoints under `storage/name`;
    the state of its last checkpoint. A folder holding checkpoints of another config is refused
    before Ray Train starts, and a run whose checkpoint has all `epochs` is not started again
    (Ray Train's controller and worker group would take 15-20 s to hand back that checkpoint)."""
    previous = newest_state(storage / name)
    if previous is not None and previous["key"] != key:
        raise RayltError(
            f"{storage} holds checkpoints of a different config; pass another `name` (or --out) to start a new run"
        )
    if previous is not None and int(previous["epoch"]) + 1 >= epochs:
        log.info("%s: all %d epochs were trained earlier in %s; its last checkpoint is used",
                 name, epochs, storage / name)
        return previous
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
    )
    result = fit_interruptible(trainer)
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    if state["key"] != key:
        raise RayltError(f"{storage} holds a finished run of a different config; use another `name` or output dir")
    return state
