"""Starting or joining Ray, and reading what the cluster offers."""

from __future__ import annotations

import logging
import os

import ray

from raylt.config import RayConfig
from raylt.ops.console import ray_logging_level, route_worker_logs

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Join `ray.address` (or RAY_ADDRESS, as `ray job submit` sets) or start a local Ray.

    A local Ray uses `address="local"` so that it never attaches to a cluster someone else
    started on this machine by accident.
    """
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True, logging_level=ray_logging_level())
    else:
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_memory,
            include_dashboard=False,
            log_to_driver=True,
            logging_level=ray_logging_level(),
        )
    route_worker_logs()


def join_cluster(cfg: RayConfig, workers) -> None:
    """Ray for a fit, started only where a stage needs it: a cluster to join (`ray.address` or
    RAY_ADDRESS) or a Ray Train worker group (`train.num_workers` above 0). A fit on one machine
    runs Ray Train's local mode, and its stages start a local Ray themselves when their input
    is large (class statistics) or they run Ray Data (the adapter's writes): starting one
    costs about 3 s, and stopping it as much again at exit."""
    if cfg.address or os.environ.get("RAY_ADDRESS") or (workers != "auto" and int(workers) > 0):
        init_ray(cfg)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def worker_threads(requested: int, local_workers: int) -> int:
    """Torch threads for a Ray Train worker: `requested`, or this node's CPUs shared among the
    workers on it.

    Ray sets OMP_NUM_THREADS to a worker's CPU reservation, and a fractional one (the default
    `train.cpus_per_worker`, so that Ray Data keeps a CPU) gives one thread: the head's matrix
    products then used one core of two. The workers read their data once and then only compute,
    so the node's cores are theirs.
    """
    if requested:
        return requested
    node = ray.get_runtime_context().get_node_id()
    logical = next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node), 1)
    cpus = min(int(logical), len(os.sched_getaffinity(0)))
    return max(1, cpus // max(local_workers, 1))
