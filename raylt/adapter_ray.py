"""Ray adapters of the feature-adapter stage: BNS training in Ray Train, then the adapted
embeddings of every split written with Ray Data.

Input: an `EmbeddingSet` and the `adapter` config. Output: `<out>/adapted-<key>/` holding
`part-*.parquet` (the embedding contract, adapted embeddings), `classnames.txt` and
`adapter.npz` (the MLP's weights, which the logged model applies before the head); the
folder is reused by any later run with the same inputs and adapter config.

Every train worker holds the whole train split (embeddings are small): balanced batches need
every class's rows, and a row-split shard would only offer its own classes as negatives.
Each rank draws its own batches (generator seeded by seed, epoch and rank); DDP averages
their gradients.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from raylt.embeddings import EmbeddingSet, open_embeddings

log = logging.getLogger(__name__)


def adapter_key(cfg, es_key: str) -> str:
    from raylt.config import to_dict

    keep = {"adapter": to_dict(cfg.adapter), "seed": cfg.seed, "workers": cfg.train.num_workers, "inputs": es_key}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def adapter_loop(config: dict) -> None:
    """The per-worker BNS loop (Ray Train)."""
    import ray.train
    import ray.train.torch

    from raylt.adapter import ResidualAdapter, adapter_epoch, adapter_steps
    from raylt.train import epoch_generator
    from raylt.tracking import log_epoch
    from raylt.train_ray import _read_shard, _report, _resume

    cfg = config["cfg"]
    acfg = cfg.adapter
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    adapter = ray.train.torch.prepare_model(ResidualAdapter(config["dim"], acfg.hidden))
    plain = adapter.module if hasattr(adapter, "module") else adapter
    opt = torch.optim.AdamW(adapter.parameters(), lr=acfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=acfg.epochs)
    start = _resume(plain, opt, sched, config["key"])
    if start >= acfg.epochs:
        return
    x, y, _ = _read_shard(ray.train.get_dataset_shard("train"), device)
    y_np = y.cpu().numpy()
    steps = adapter_steps(len(y_np), acfg, world)
    target = config["tracking"] if rank == 0 else None
    for epoch in range(start, acfg.epochs):
        loss = adapter_epoch(adapter, opt, x, y_np, acfg, steps, epoch_generator(cfg.seed, epoch, rank))
        sched.step()
        metrics = {"epoch": epoch, "adapter_loss": loss}
        _report(plain, opt, sched, epoch, config["key"], metrics, rank)
        target = log_epoch(target, metrics, epoch)


def adapt(cfg, es: EmbeddingSet, es_key: str, out: Path, tracking: dict | None) -> tuple[EmbeddingSet, dict]:
    """The adapted embedding set (trained and written, or reused) and the adapter's weights."""
    from raylt.adapter import adapter_params
    from raylt.embeddings import ray_dataset
    from raylt.train_ray import run_trainer

    key = adapter_key(cfg, es_key)
    folder = out / f"adapted-{key}"
    done = folder / "adapter.npz"
    if done.is_file():
        log.info("adapted embeddings reused from %s", folder)
        return open_embeddings(folder, str(folder / "classnames.txt")), _load(done)
    t0 = time.perf_counter()
    state = run_trainer(adapter_loop, {"dim": es.dim, "tracking": tracking}, {"train": ray_dataset(es, "train")},
                        cfg, out, "adapter", key)
    from raylt.adapter import ResidualAdapter

    module = ResidualAdapter(es.dim, cfg.adapter.hidden)
    module.load_state_dict(state["model"])
    params = adapter_params(module)
    _write_adapted(es, params, folder)
    np.savez(folder / "tmp-adapter.npz", **params)
    os.replace(folder / "tmp-adapter.npz", done)  # written last: marks the folder complete
    log.info("adapter (%s) trained and applied in %.1f s -> %s", cfg.adapter.name, time.perf_counter() - t0, folder)
    return open_embeddings(folder, str(folder / "classnames.txt")), params


def _load(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _write_adapted(es: EmbeddingSet, params: dict, folder: Path) -> None:
    """Every split through the adapter (Ray Data, CPU tasks), as the embedding contract."""
    import shutil

    import pyarrow as pa
    import ray

    from raylt.pyfunc import adapter_numpy
    from raylt.embeddings import _table_arrays
    from raylt.store import embedding_table

    if folder.exists():
        shutil.rmtree(folder)  # an unfinished folder of our own (no adapter.npz): never a user's
    folder.mkdir(parents=True)
    dim, ref = es.dim, ray.put(params)

    def apply(batch: pa.Table) -> pa.Table:
        x, y = _table_arrays(batch, dim)
        ids = batch["id"] if "id" in batch.column_names else pa.array([""] * len(y))
        return embedding_table(adapter_numpy(ray.get(ref), x), y, batch["split"].to_numpy(zero_copy_only=False),
                               ids.to_numpy(zero_copy_only=False))

    ds = ray.data.read_parquet(list(es.files)).map_batches(apply, batch_format="pyarrow")
    ds.write_parquet(str(folder))
    (folder / "classnames.txt").write_text("\n".join(es.class_names) + "\n")
