"""Starting or joining Ray, and reading what the cluster offers."""

from __future__ import annotations

import logging
import os

from raylt.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Join `ray.address` (or RAY_ADDRESS, as `ray job submit` sets) or start a local Ray.

    A local Ray uses `address="local"` so that it never attaches to a cluster someone else
    started on this machine by accident.
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_memory,
            include_dashboard=False,
            log_to_driver=True,
        )


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))
