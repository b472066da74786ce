"""A config's embedding recipe, told without the model: how a finished store is found again
without importing torch or starting Ray.

The store's own key (`raylt.embed.store.fingerprint`) holds the encoder's identity, which the
built model reports (its preprocessing included), and the precision, which the cluster's GPUs
decide. Building the model and starting Ray to learn them took 20 s of the 21 s of a `raylt
embed` whose store was already finished. The recipe key is made of what decides those two
values: the backbone config, the weights' tag or checksum, the open_clip version that reads
them, the precision the stage will pick, and the data set's fingerprint. `run_embed` names the
store of each recipe it finishes or reuses (`EmbeddingStore.remember`); the next run with the
same recipe finds it (`finished_store`), checks its shards' checksums and reuses it. Whenever
the precision cannot be told here (a cluster to join, or NVIDIA GPUs on this machine), or no
finished store is named, the full path runs: it builds the encoder and asks Ray, as before.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
from importlib import metadata
from pathlib import Path

from raylt.config import BackboneConfig, RayltConfig, to_dict
from raylt.data import Source
from raylt.embed.mirror import working_root
from raylt.embed.store import RECIPES, STORE_FORMAT, EmbeddingStore
from raylt.errors import BackboneError
from raylt.ops.hashing import file_sha256, json_key

log = logging.getLogger(__name__)

# Settings that change where weights are looked for, not which weights or vectors.
_PLACE_ONLY = ("cache_dir", "offline")


def weights_identity(cfg: BackboneConfig) -> str:
    """Tag name, or the checksum of a weight file or `local-dir:` checkpoint."""
    if cfg.model and cfg.model.startswith("local-dir:"):
        folder = Path(cfg.model[len("local-dir:"):]).expanduser()
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        if not files:
            raise BackboneError(f"backbone.model {cfg.model}: no checkpoint (*.safetensors, *.bin, *.pt) in {folder}")
        return "sha256:" + file_sha256(files[0])
    if cfg.pretrained is None:
        return "random-init"
    p = Path(cfg.pretrained).expanduser()
    if p.is_file():
        return "sha256:" + file_sha256(p)
    if os.sep in cfg.pretrained or cfg.pretrained.endswith((".pt", ".bin", ".safetensors", ".pth")):
        raise BackboneError(
            f"backbone.pretrained weight file {p} does not exist; copy the checkpoint there or fix the path"
        )
    return "tag:" + cfg.pretrained


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def recipe_key(cfg: RayltConfig, data_fingerprint: str, precision: str, decode: str = "tasks") -> str:
    """The key of everything that decides a store's vectors, from the config and the data."""
    bb = cfg.backbone
    extra = Path(bb.model_config).expanduser() if bb.model_config else None
    return json_key({
        **({"decode": decode} if decode != "tasks" else {}),  # as in the store's inputs
        "backbone": {k: v for k, v in to_dict(bb).items() if k not in _PLACE_ONLY},
        "weights": weights_identity(bb),
        "model_config": file_sha256(extra) if extra and extra.is_file() else None,
        # the preprocessing of a named architecture comes from open_clip's own model configs
        "open_clip": _version("open_clip_torch") if bb.name == "open_clip" else None,
        "precision": precision,
        "data": data_fingerprint,
        "shard_size": cfg.embed.shard_size,
        "store_format": STORE_FORMAT,
    })


def local_gpus(cfg: RayltConfig) -> bool | None:
    """Whether the cluster the stage will run on has GPUs, when that can be told without
    starting Ray: a Ray already running here, or one about to start here (no NVIDIA device:
    none). None when a cluster to join decides, or NVIDIA devices are here."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return bool(ray.cluster_resources().get("GPU", 0))
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return None
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False  # Ray counts no GPU where none is visible
    return None if glob.glob("/dev/nvidia[0-9]*") else False


def local_precision(cfg: RayltConfig) -> str | None:
    """The precision `plan_resources` will pick, when it can be told without Ray: the configured
    one, or `auto` where `local_gpus` tells (bf16 with GPUs, fp32 without). None otherwise."""
    if cfg.embed.precision != "auto":
        return cfg.embed.precision
    gpus = local_gpus(cfg)
    return None if gpus is None else "bf16" if gpus else "fp32"


def local_decode(cfg: RayltConfig) -> str | None:
    """Where `plan_resources` will have images decoded, when it can be told without Ray."""
    if cfg.embed.decode != "auto":
        return cfg.embed.decode
    gpus = local_gpus(cfg)
    return None if gpus is None else "actor" if gpus else "tasks"


def finished_store(cfg: RayltConfig, source: Source) -> EmbeddingStore | None:
    """The finished, undamaged store of this config's recipe, or None (then `run_embed`'s full
    path decides: it builds the encoder, asks Ray, repairs or embeds). A store.root on object
    storage: the recipes and the store they name are brought into the local copy first
    (raylt.embed.mirror)."""
    precision, decode = local_precision(cfg), local_decode(cfg)
    if precision is None or decode is None:
        return None
    root, mirror = working_root(cfg.store.root, cfg.store.staging)
    key = recipe_key(cfg, source.fingerprint(), precision, decode)
    if mirror is not None:
        mirror.pull(RECIPES)
        if name := EmbeddingStore.recalled_name(root, key):
            mirror.pull(name)
    store = EmbeddingStore.recalled(root, key)
    if store is None or store.num_rows != source.table.num_rows:
        return None
    with store.writing():  # a writer repairing it finishes first
        if store.is_complete() and not store.verify():
            if mirror is not None:  # found in the local copy only: a push before failed
                mirror.publish(store.path)
            return store
    return None
