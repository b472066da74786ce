"""Ray adapters of the feature-adapter stage: BNS training in Ray Train (local mode on one
node, raylt.ops.trainer), then the adapted
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

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import ray
import torch

from raylt.config import AdapterConfig, to_dict
from raylt.embed.inputs import EmbeddingSet, open_embeddings, table_arrays
from raylt.embed.store import embedding_table
from raylt.methods.bns import ResidualAdapter, adapter_epoch, adapter_optimizer, adapter_params, adapter_steps
from raylt.methods.bns_artifact import adapter_numpy, load_adapter, save_adapter
from raylt.ops.cluster import init_ray
from raylt.ops.hashing import json_key
from raylt.ops.optim import epoch_generator
from raylt.ops.trainer import (RowSource, TrainerRun, load_rows, prepare, report, resolve_workers, resume,
                               run_trainer, worker_context)
from raylt.tracking import log_epoch

log = logging.getLogger(__name__)


def adapter_key(cfg, es_key: str) -> str:
    """What adapted embeddings must agree with to be reused: the inputs and the adapter's training."""
    return json_key({"adapter": to_dict(cfg.adapter), "seed": cfg.seed,
                     "workers": max(resolve_workers(cfg.train.num_workers), 1), "inputs": es_key}, 12)


@dataclass(frozen=True)
class AdapterJob:
    """What the driver hands every worker of the adapter stage."""

    adapter: AdapterConfig
    seed: int
    dim: int
    rows: RowSource  # the whole train split: every worker holds it
    tracking: dict | None


def adapter_loop(job: AdapterJob, run: TrainerRun) -> None:
    """The per-worker BNS loop (Ray Train; in the driver in local mode)."""
    acfg = job.adapter
    rank, world, device = worker_context(run)
    torch.manual_seed(job.seed)
    adapter, plain = prepare(ResidualAdapter(job.dim, acfg.hidden), run, device)
    opt, sched = adapter_optimizer(adapter, acfg)
    start = resume(plain, opt, sched, run)
    if start >= acfg.epochs:
        return
    x, y, _ = load_rows(job.rows, device)
    y_np = y.cpu().numpy()
    steps = adapter_steps(len(y_np), acfg, world)
    target = job.tracking if rank == 0 else None
    for epoch in range(start, acfg.epochs):
        loss = adapter_epoch(adapter, opt, x, y_np, acfg, steps, epoch_generator(job.seed, epoch, rank))
        sched.step()
        metrics = {"epoch": epoch, "adapter_loss": loss}
        report(plain, opt, sched, epoch, metrics, rank, run)
        target = log_epoch(target, metrics, epoch)


def adapt(cfg, es: EmbeddingSet, es_key: str, out: Path, tracking: dict | None) -> tuple[EmbeddingSet, dict]:
    """The adapted embedding set (trained and written, or reused) and the adapter's weights."""
    key = adapter_key(cfg, es_key)
    folder = out / f"adapted-{key}"
    done = folder / "adapter.npz"
    if done.is_file():
        log.info("adapted embeddings reused from %s", folder)
        return open_embeddings(folder, str(folder / "classnames.txt")), load_adapter(done)
    t0 = time.perf_counter()
    rows = RowSource(es.files, es.dim, "train", 0, int(es.train_counts.sum()))
    job = AdapterJob(cfg.adapter, cfg.seed, es.dim, rows, tracking)
    state = run_trainer(adapter_loop, job, cfg.train, out, "adapter", key, cfg.adapter.epochs)
    module = ResidualAdapter(es.dim, cfg.adapter.hidden)
    module.load_state_dict(state["model"])
    params = adapter_params(module)
    init_ray(cfg.ray)  # the adapted embeddings are written by Ray Data
    _write_adapted(es, params, folder)
    save_adapter(params, done)  # written last: marks the folder complete
    log.info("adapter (%s) trained and applied in %.1f s -> %s", cfg.adapter.name, time.perf_counter() - t0, folder)
    return open_embeddings(folder, str(folder / "classnames.txt")), params


def _write_adapted(es: EmbeddingSet, params: dict, folder: Path) -> None:
    """Every split through the adapter (Ray Data, CPU tasks), as the embedding contract."""
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished folder of our own (no adapter.npz): never a user's
    folder.mkdir(parents=True)
    dim, ref = es.dim, ray.put(params)

    def apply(batch: pa.Table) -> pa.Table:
        x, y = table_arrays(batch, dim)
        ids = batch["id"] if "id" in batch.column_names else pa.array([""] * len(y))
        return embedding_table(adapter_numpy(ray.get(ref), x), y, batch["split"].to_numpy(zero_copy_only=False),
                               ids.to_numpy(zero_copy_only=False))

    # Rows in the input's order, so the adapted train split (and the head's shards) are the same each run.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.read_parquet(list(es.files)).map_batches(apply, batch_format="pyarrow")
    ds.write_parquet(str(folder))
    (folder / "classnames.txt").write_text("\n".join(es.class_names) + "\n")
