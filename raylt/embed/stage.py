"""The embedding stage: images -> L2-normalised float32 embeddings in the embedding store.

Ray Data runs it: CPU tasks decode and resize (`images.decode_batch`), an actor pool of
encoders (one GPU each when the cluster has GPUs, CPUs otherwise) runs the frozen model, and
the driver streams the results into shards of the store. Embeddings are ~2 KB per image, so
the driver is never the bottleneck, and only the driver needs write access to the store.

Input: a data source (`raylt.data`). Output: `<store.root>/<fingerprint>/` (see `raylt.embed.store`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch

from raylt.config import BackboneConfig, EmbedConfig, RayltConfig, to_dict
from raylt.data import Source, load_source
from raylt.embed.backbones import build_encoder
from raylt.embed.cache import ImageCache, as_hashes
from raylt.embed.device_decode import decode_on_device
from raylt.embed.images import decode_batch, hash_batch, read_batch
from raylt.embed.mirror import working_root
from raylt.embed.recipe import finished_store, recipe_key
from raylt.embed.store import EmbeddingStore
from raylt.errors import DataError
from raylt.ops.cluster import cluster_cpus, cluster_gpus, init_ray
from raylt.ops.console import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedResult:
    store: Path
    manifest: dict
    reused: bool
    computed_rows: int
    seconds: float
    warmup_s: float = 0.0  # stage start to the first embedded batch: worker and model start-up
    encoded_rows: int = 0  # of computed_rows, those through the decode tasks and the encoder (the rest: the image cache)

    @property
    def steady_images_per_s(self) -> float:
        """Throughput after the first batch arrived: what a long run approaches."""
        span = self.seconds - self.warmup_s
        return self.computed_rows / span if span > 0 else self.images_per_s

    @property
    def images_per_s(self) -> float:
        return self.computed_rows / self.seconds if self.seconds > 0 else 0.0


class EncodeActor:
    """Ray Data actor: builds the frozen encoder once, then embeds batches: decoded uint8
    pixels, or encoded bytes that it decodes on its own device first (`plan.decode == "actor"`,
    raylt.embed.device_decode)."""

    def __init__(self, backbone: BackboneConfig, plan: "ResourcePlan"):
        if not plan.gpus_per_actor:
            torch.set_num_threads(plan.threads_per_actor)
        self.precision = plan.precision
        self.device = "cuda" if plan.gpus_per_actor else "cpu"
        self.encoder = build_encoder(backbone).to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok, errors = batch["ok"], batch["error"]
        emb = np.zeros((len(ok), self.encoder.dim), dtype=np.float32)
        if "encoded" in batch and ok.any():
            rows = np.flatnonzero(ok)
            pixels, decoded, why = decode_on_device(batch["encoded"][rows], self.encoder.spec, self.device,
                                                    batch["raw"][rows])
            ok, errors = ok.copy(), errors.copy()
            ok[rows], errors[rows] = decoded, why
            pixels = pixels[torch.from_numpy(decoded).to(pixels.device)]
        elif ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
        if ok.any():
            emb[ok] = self.encoder.encode(pixels, self.precision).float().cpu().numpy()
        out = {k: batch[k] for k in ("row", "id", "label", "split", "hash") if k in batch}
        out.update(ok=ok, error=errors, embedding=emb)
        return out


@dataclass(frozen=True)
class ResourcePlan:
    """How the stage uses a cluster: encoder actors, their GPUs and threads, decode tasks."""

    actors: int
    gpus_per_actor: int
    threads_per_actor: int
    decode_tasks: int
    precision: str
    decode: str = "tasks"  # where images are decoded: "tasks" (CPU tasks) or "actor" (the encoder's device)


def plan_resources(cfg: EmbedConfig, cpus: int, gpus: int) -> ResourcePlan:
    """Pure: the plan for a cluster with `cpus` CPUs and `gpus` GPUs.

    GPUs are asked for only when the cluster has them (asking on a CPU-only cluster waits
    forever). On CPU, CPUs - 1 actors leave a CPU for decoding; Ray pins an actor to as many
    threads as CPUs it reserves, but a CPU encoder is model-bound while decoding needs a small
    part of a core, so the actors run `cpus / actors` threads each. Ray Data fuses a task stage
    into the next actor stage unless the task pool's size differs from the actor pool's; fused,
    decoding would run inside the encoder actors, so the two sizes are kept apart. With GPUs,
    the actors decode the JPEGs on them (`decode="actor"`, raylt.embed.device_decode): 16 CPU
    cores decoded 2,672 images/s where an H100 encodes 6,614 (docs/BENCHMARKS.md).
    """
    actors = cfg.num_actors or (gpus if gpus else max(1, cpus - 1))
    threads = cfg.threads_per_actor or max(1, cpus // actors)
    decoders = cfg.decode_tasks or max(1, cpus)
    decoders += decoders == actors
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if gpus else "fp32")
    decode = cfg.decode if cfg.decode != "auto" else ("actor" if gpus else "tasks")
    return ResourcePlan(actors, 1 if gpus else 0, threads, decoders, precision, decode)


_BLOCK_ROWS = 1024  # most source rows per Ray Data block (see block_rows)


def block_rows(decode_batch_size: int, decode_tasks: int, n_rows: int) -> int:
    """Source rows per Ray Data block: four or more blocks per decode task, so that the tasks
    share the work evenly, but no fewer rows than a decode batch and up to 1,024. Every block
    costs the driver about 5 ms to hand over and a task to start: in blocks of 64 rows, Ray
    Data's own overhead was 5 s per 20,000 images on 2 CPUs, against 0.4 s in blocks of 1,024
    (docs/BENCHMARKS.md). A task streams its output batch by batch,
    so a larger block does not hold more pixels in memory."""
    return max(decode_batch_size, min(_BLOCK_ROWS, -(-n_rows // (4 * max(decode_tasks, 1)))))


def pending_blocks(source: Source, store: EmbeddingStore, shards: list[int], block_rows: int) -> list[pa.Table]:
    """The source rows of the pending shards, cut into blocks (one decode task each)."""
    table = source.table.append_column("row", pa.array(np.arange(source.table.num_rows, dtype=np.int64)))
    blocks = []
    for k in shards:
        lo, hi = store.shard_rows(k)
        blocks += [table.slice(s, min(block_rows, hi - s)) for s in range(lo, hi, block_rows)]
    return blocks


def _offenders(skipped: list[dict], n: int) -> str:
    return "; ".join(f"{s['id']} ({s['error']})" for s in skipped[:n])


def _too_many_bad(skipped: list[dict], total: int, max_fraction: float) -> str | None:
    """The error once more images failed than `max_fraction` allows for the whole data set."""
    allowed = int(max_fraction * total)
    if len(skipped) <= allowed:
        return None
    first = _offenders(skipped, 5)
    return (
        f"{len(skipped)} of {total} images already could not be read, above data.max_bad_fraction={max_fraction}: "
        f"{first}. Fix or remove them (finished shards are kept), or raise data.max_bad_fraction"
    )


def decode_pool(plan: ResourcePlan, blocks: list) -> int:
    """Decode tasks for `blocks`: no more than there are blocks (a few added images are one
    block, and Ray Data warns of a pool larger than its input)."""
    return max(1, min(plan.decode_tasks, len(blocks)))


def build_dataset(cfg: RayltConfig, blocks: list[pa.Table], encoder, plan: ResourcePlan, filesystem=None,
                  hashes: bool = False):
    """Ray Data plan: blocks of source rows -> CPU decode tasks -> encoder actor pool
    (`filesystem`: the source's, when its files are on object storage; `hashes`: each row's
    content hash too, for the image cache)."""
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        read_batch if plan.decode == "actor" else decode_batch,  # actor: the tasks only read bytes
        fn_kwargs={"spec": encoder.spec, "filesystem": filesystem, "hashes": hashes},
        batch_size=cfg.embed.decode_batch_size,
        compute=ray.data.TaskPoolStrategy(size=decode_pool(plan, blocks)),
        num_cpus=1,
    )
    return ds.map_batches(
        EncodeActor,
        fn_constructor_kwargs={"backbone": cfg.backbone, "plan": plan},
        batch_size=cfg.embed.batch_size,
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_gpus=plan.gpus_per_actor,
        num_cpus=cfg.embed.cpus_per_actor,
    )


def usable_rows(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(ok, error) of an encoded batch: an encoder that overflows (fp16 on odd inputs) gives
    NaN or infinite values, which become a counted skip like an unreadable image, never a row."""
    ok, errors = batch["ok"], batch["error"]
    broken = ok & ~np.isfinite(batch["embedding"]).all(axis=1)
    if broken.any():
        ok, errors = ok & ~broken, errors.copy()
        errors[broken] = "the encoder returned NaN or infinite values; try embed.precision=fp32"
    return ok, errors


def stream_into_store(ds, store: EmbeddingStore, n_rows: int, total: int, max_bad_fraction: float,
                      cache: ImageCache | None = None) -> tuple[int, float]:
    """Write results to the store as they arrive; stop as soon as too many images fail.

    Every shard with an unread image is pending, so this run sees all skips of the store.
    The rows embedded are added to `cache` (every 4,096 and at the end, also when the run stops
    early). Returns the rows done and the seconds until the first batch arrived.
    """
    t0, done, skipped, warmup, shards = time.perf_counter(), 0, [], None, 0
    new: list[tuple[np.ndarray, np.ndarray]] = []
    progress = Progress("embedded", n_rows, "images", log)

    def flush() -> None:
        if new:
            cache.append(np.concatenate([h for h, _ in new]), np.concatenate([e for _, e in new]))
            new.clear()

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            ok, errors = usable_rows(batch)
            if warmup is None:
                warmup = time.perf_counter() - t0
            if cache is not None:
                new.append((batch["hash"][ok], batch["embedding"][ok]))
                if sum(len(h) for h, _ in new) >= 4096:
                    flush()
            written = store.add(batch["row"], batch["embedding"], ok, batch["label"], batch["split"], batch["id"],
                                errors)
            done, shards = done + len(ok), shards + len(written)
            progress.update(done, f"{shards}/{store.num_shards} shards written")
            # Checked after the shards this batch completed are written, so they are kept.
            skipped += [{"id": i, "error": e} for i, e in zip(batch["id"][~ok], errors[~ok])]
            if msg := _too_many_bad(skipped, total, max_bad_fraction):
                raise DataError(msg)
    finally:
        progress.close()
        flush()
    return done, warmup or 0.0


def run_embed(cfg: RayltConfig, source: Source | None = None, encoder=None, retry_skipped: bool = False) -> EmbedResult:
    """Embed every image of the configured data set into the store, reusing finished work
    (`source` and `encoder`: the config's, when the caller has them already; `retry_skipped`:
    embed again the shards of a finished store that skipped unreadable images)."""
    t0 = time.perf_counter()
    source = source or load_source(cfg.data)
    log.info("data: %s", source.summary())
    root, mirror = working_root(cfg.store.root, cfg.store.staging)  # a local copy of a root on object storage
    found = None if retry_skipped else finished_store(cfg, source)  # without the model or Ray (raylt.embed.recipe)
    if found is not None:
        log.info("embedding store %s is complete: reused", found.path)
        return EmbedResult(found.path, found.manifest(), True, 0, time.perf_counter() - t0)
    encoder = encoder or build_encoder(cfg.backbone)  # fails here, before any Ray work, on missing weights
    init_ray(cfg.ray)
    plan = plan_resources(cfg.embed, cluster_cpus(), cluster_gpus())
    inputs = {
        "backbone": encoder.identity,
        "precision": plan.precision,
        "data": source.fingerprint(),
        "shard_size": cfg.embed.shard_size,
        # decoded by the actors, the pixels differ a little (raylt.embed.device_decode): a store
        # and a cache of their own; the CPU path keeps the keys it always had
        **({"decode": plan.decode} if plan.decode != "tasks" else {}),
    }
    store = EmbeddingStore.open(root, inputs, source.table.num_rows)
    cache = ImageCache(root, {**encoder.identity, **({"decode": plan.decode} if "decode" in inputs else {})},
                       plan.precision)
    with store.writing():
        if mirror is not None:  # what the object store holds of this store and of the image cache
            mirror.pull(store.path.name)
            mirror.pull(cache.path.relative_to(root).as_posix())
        damaged = store.verify()
        if damaged:
            log.warning("embedding store %s: %d damaged shard(s) are recomputed: %s", store.path, len(damaged),
                        ", ".join(f"part-{k:05d} ({why})" for k, why in list(damaged.items())[:5]))
            store.drop(damaged)
        if retry_skipped and (n := store.retry_skipped()):
            log.info("embedding store %s: %d image(s) skipped earlier are tried again", store.path, n)
        pending = store.pending_shards()
        if not pending:
            log.info("embedding store %s is complete: reused", store.path)
            res = EmbedResult(store.path, store.manifest(), True, 0, time.perf_counter() - t0)
        else:
            res = _embed_pending(cfg, source, store, pending, encoder, plan, cache)
        store.remember(recipe_key(cfg, inputs["data"], plan.precision, plan.decode))
        if mirror is not None:
            mirror.publish(store.path, cache.path)
        return res


def _fill_from_cache(blocks: list[pa.Table], source: Source, store: EmbeddingStore, cache: ImageCache,
                     plan: ResourcePlan) -> np.ndarray:
    """Hash the pending rows' bytes (CPU tasks: read and SHA-256, no decoding) and put the rows
    whose image the cache holds into the store from it; returns those rows."""
    ds = ray.data.from_arrow(blocks).map_batches(
        hash_batch, fn_kwargs={"filesystem": source.filesystem}, batch_size=1024,
        compute=ray.data.TaskPoolStrategy(size=decode_pool(plan, blocks)), num_cpus=1,
    )
    known, done = cache.known(), []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows, hashes = batch["row"][batch["readable"]], as_hashes(batch["hash"][batch["readable"]])
        at = np.minimum(np.searchsorted(known, hashes), len(known) - 1)
        hit = known[at] == hashes
        if not hit.any():
            continue
        rows = rows[hit]
        t = source.table.take(pa.array(rows))
        store.add(rows, cache.get(hashes[hit]), np.ones(len(rows), bool), t["label"].to_numpy(),
                  t["split"].to_numpy(zero_copy_only=False), t["id"].to_numpy(zero_copy_only=False),
                  np.full(len(rows), "", dtype=object))
        done.append(rows)
    return np.concatenate(done) if done else np.zeros(0, np.int64)


def _embed_pending(cfg: RayltConfig, source: Source, store: EmbeddingStore, pending: list[int], encoder,
                   plan: ResourcePlan, cache: ImageCache) -> EmbedResult:
    n_rows = sum(hi - lo for lo, hi in map(store.shard_rows, pending))
    log.info(
        "embedding %d images (%d of %d shards) with %d %s actor(s), %s, into %s",
        n_rows, len(pending), store.num_shards, plan.actors, "GPU" if plan.gpus_per_actor else "CPU",
        plan.precision, store.path,
    )
    t_run = time.perf_counter()
    known = cache.known()
    blocks = pending_blocks(source, store, pending, block_rows(cfg.embed.decode_batch_size, plan.decode_tasks, n_rows))
    cached = _fill_from_cache(blocks, source, store, cache, plan) if len(known) else np.zeros(0, np.int64)
    if len(cached):  # the rest go through the decode tasks and the encoder
        blocks = [b for b in (b.filter(pa.array(~np.isin(b["row"].to_numpy(), cached))) for b in blocks) if b.num_rows]
    encoded, warmup = 0, 0.0
    if blocks:
        ds = build_dataset(cfg, blocks, encoder, plan, source.filesystem, hashes=True)
        encoded, warmup = stream_into_store(ds, store, n_rows - len(cached), source.table.num_rows,
                                            cfg.data.max_bad_fraction, cache)
    done = encoded + len(cached)
    elapsed = time.perf_counter() - t_run
    if done > encoded:
        log.info("%d of %d images were in the image cache (%s): %d encoded", done - encoded, done, cache.path, encoded)
    manifest = store.finalize(
        encoder.dim,
        # backbone_config: how to build the encoder again, so that a model fitted on this store
        # (`raylt fit --embeddings STORE`) can embed new images itself.
        {"class_names": list(source.class_names), "source": source.origin, "images_per_s": round(done / elapsed, 2),
         "backbone_config": to_dict(cfg.backbone)},
    )
    if manifest["skipped"]:
        log.warning("%d unreadable images skipped, e.g. %s; all are listed in %s/part-*.json",
                    manifest["skipped"], _offenders(store.skipped(), 3), store.path)
    log.info("embedding store %s complete: %d embeddings, D=%d", store.path, manifest["embedded"], encoder.dim)
    return EmbedResult(store.path, manifest, False, done, elapsed, warmup, encoded)
