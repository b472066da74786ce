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
import shutil
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
from raylt.ops.checkpoints import KEY_FILE, newest_checkpoint, refuse_other_config  # noqa: E402
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
    ref of (x, y, keep) arrays (in local mode, the arrays).

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
    if isinstance(src.ref, tuple):  # local mode: the driver's own arrays
        (x, y, keep), copy = src.ref, False
    elif src.ref is not None:
        x, y, keep = ray.get(src.ref)  # read-only views on the object store: torch copies them
        copy = True
    else:  # arrays of our own, shaped to the shard: wrapped, not copied (1.3 GB at iNaturalist size)
        (x, y), keep, copy = read_rows(src.files, src.dim, src.split, src.lo, src.hi), None, False
    if src.rows() is not None and len(y) != src.rows():
        raise RayltError(f"a train shard holds {len(y)} rows where it was cut to {src.rows()}")

    def as_tensor(a):
        return (torch.tensor(a) if copy else torch.from_numpy(a)).to(device)

    return as_tensor(x), as_tensor(y), as_tensor(keep) if keep is not None else None


@dataclass(frozen=True)
class TrainerRun:
    """How the harness runs a stage's loop, handed to every worker beside the stage's own job
    (built by `run_trainer` only)."""

    key: str  # the config key every checkpoint carries (a folder of another config is refused)
    epochs: int
    threads: int  # torch threads per worker; 0: the node's CPUs shared among its workers
    use_gpu: bool
    local: bool  # Ray Train's local mode: the loop runs in this process, without a worker group
    run_dir: str  # storage/name: Ray Train's run folder, where local mode keeps its checkpoints


def worker_context(run: TrainerRun) -> tuple[int, int, torch.device]:
    """(rank, world size, torch device) of the calling worker."""
    if run.local:  # rank 0 of 1; Ray Train's get_device needs a worker group's GPU assignment
        return 0, 1, torch.device("cuda" if run.use_gpu and torch.cuda.is_available() else "cpu")
    import ray.train.torch

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def prepare(module, run: TrainerRun, device):
    """(the module a worker steps: DDP-wrapped in a worker group, the plain module to save)."""
    if run.local:
        return module.to(device), module
    import ray.train.torch

    wrapped = ray.train.torch.prepare_model(module)
    return wrapped, wrapped.module if hasattr(wrapped, "module") else wrapped


def resume(module, opt, sched, run: TrainerRun) -> int:
    """The first epoch to train: 0, or the one after the checkpoint Ray Train hands back (a
    restarted worker or a re-run; in local mode the newest one in the run folder), whose
    module, optimiser and schedule state are loaded."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    elif run.local:
        state = newest_state(Path(run.run_dir))
    else:
        state = None
    if state is None:
        return 0
    if state["key"] != run.key:
        raise RayltError("the run's checkpoints were made with a different config; use another `name` or output dir")
    module.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    return int(state["epoch"]) + 1


_KEEP = 2  # checkpoints kept per run (CheckpointConfig(num_to_keep) of a worker group)


def report(module, opt, sched, epoch: int, metrics: dict, rank: int, run: TrainerRun) -> None:
    """One epoch's report from every rank, with rank 0's checkpoint (module, optimiser,
    schedule, epoch and config key): Ray Train needs the same number of reports from all.

    Ray Train's local mode keeps only a reference to the last reported checkpoint, not its
    files: there rank 0 writes the checkpoint into the run folder itself (atomically, the
    newest `_KEEP` kept), where `resume` and `newest_state` find it again."""
    if rank != 0:
        ray.train.report(metrics)
        return
    state = {"model": module.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
             "epoch": epoch, "key": run.key}
    if run.local:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(_save_local(state, run, epoch)))
        return
    with tempfile.TemporaryDirectory() as d:
        _write(state, Path(d))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _write(state: dict, folder: Path) -> None:
    """A checkpoint's files: the state, and its config key where a command reads it without
    torch (raylt.ops.checkpoints)."""
    torch.save(state, folder / "state.pt")
    (folder / KEY_FILE).write_text(state["key"] + "\n")


def _save_local(state: dict, run: TrainerRun, epoch: int) -> str:
    root = Path(run.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint_local_{epoch:06d}"
    tmp = root / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # a copy left by a killed run: ours, never a user's
    tmp.mkdir()
    _write(state, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("checkpoint_local_*"))[:-_KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return str(final)


def newest_state(run_dir: Path) -> dict | None:
    """The state of the newest checkpoint of an earlier run in this folder, if any."""
    newest = newest_checkpoint(run_dir)
    if newest is None:
        return None
    return torch.load(newest / "state.pt", map_location="cpu", weights_only=True)


def resolve_workers(num_workers) -> int:
    """Ray Train workers of a fit: `auto` is local mode (0: the loop in this process, no worker
    group to start) on one node, one worker in a worker group on a multi-node cluster."""
    if num_workers != "auto":
        return int(num_workers)
    if not ray.is_initialized():
        return 0
    alive = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    return 0 if len(alive) <= 1 else 1


def _threads(run: TrainerRun) -> int:
    if run.local:
        return run.threads or len(os.sched_getaffinity(0))
    local = ray.train.get_context().get_local_world_size()
    return worker_threads(run.threads, local)


def with_threads(loop):
    """`loop(job, run)` run after setting the worker's torch threads
    (`raylt.ops.cluster.worker_threads`): every trainer's workers get them, whatever their
    loop. In local mode the loop runs in the driver, whose own setting comes back after."""

    def run_loop(config: dict) -> None:
        run = config["run"]
        before = torch.get_num_threads()
        torch.set_num_threads(_threads(run))
        try:
            loop(config["job"], run)
        finally:
            if run.local:
                torch.set_num_threads(before)

    return run_loop


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


def run_trainer(loop, job, train_cfg, storage: Path, name: str, key: str, epochs: int) -> dict:
    """`TorchTrainer` over `loop(job, run)` with the train config's scaling (`train.num_workers`:
    `auto` or 0 is Ray Train's local mode), checkpoints under `storage/name`; the state of its
    last checkpoint. A folder holding checkpoints of another config is refused before Ray Train
    starts, and a run whose checkpoint has all `epochs` is not started again (Ray Train's
    controller and worker group would take 15-20 s to hand back that checkpoint)."""
    run_dir = storage / name
    refuse_other_config(run_dir, key, storage)
    previous = newest_state(run_dir)
    if previous is not None and int(previous["epoch"]) + 1 >= epochs:
        log.info("%s: all %d epochs were trained earlier in %s; its last checkpoint is used", name, epochs, run_dir)
        return previous
    workers = resolve_workers(train_cfg.num_workers)
    run = TrainerRun(key, epochs, train_cfg.threads_per_worker, train_cfg.use_gpu, workers == 0, str(run_dir))
    trainer = TorchTrainer(
        with_threads(loop),
        train_loop_config={"job": job, "run": run},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=train_cfg.use_gpu and workers > 0,
            resources_per_worker={"CPU": train_cfg.cpus_per_worker} if workers else None,
            placement_strategy=train_cfg.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=_KEEP),
            failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures),
        ),
    )
    result = fit_interruptible(trainer)
    if result.checkpoint is None:
        raise RayltError(f"the {name} stage in {storage} ended without a checkpoint; run it again to resume")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    if state["key"] != key:
        raise RayltError(f"{storage} holds a finished run of a different config; use another `name` or output dir")
    return state
