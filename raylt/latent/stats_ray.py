"""Ray adapter of the class statistics: a task per group of embedding files, a tree of
merges, and the `class_stats-*.npz` cache a fit reuses. Without a Ray cluster, a small input
is reduced in this process over the same tree (`IN_PROCESS_BYTES`).

Input: the Parquet files of an `EmbeddingSet` (on shared storage on a cluster: the tasks read
them, a group of files per CPU). Output: `ClassMoments` of one split (raylt.latent.stats), and
for a fit the file `<cache>/class_stats-<transform>-r<rank>-<files key>.npz`, written
atomically and reused by any later fit of the same files, rank and transform. For a store,
the moments of aligned blocks of its files are kept in `<store.root>/moments/`, so that a
store whose data extends another's reads only its new files (raylt.latent.blocks).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray

from raylt.config import RayConfig
from raylt.embed.inputs import EmbeddingSet, embedding_dim, open_embeddings, table_arrays
from raylt.embed.store import read_manifest
from raylt.latent.blocks import BlockCache
from raylt.latent.stats import (DAMAGED, ClassMoments, block_tree, class_moments, fold_right, load_moments, merge,
                                 save_moments, tree_reduce)
from raylt.latent.transforms import TRANSFORMS
from raylt.ops.cluster import cluster_cpus, init_ray

log = logging.getLogger(__name__)

# Embedding files up to this size are reduced in this process when no Ray is running: about
# 3 s on 2 cores (100,000 rows of D = 512, 200 MB, took 1.25 s), what starting a local Ray
# takes before its first task runs (and stopping it takes again at exit).
IN_PROCESS_BYTES = 512 * 2**20


def _shard_moments(path: str, split: str, num_classes: int, rank: int, transform=None) -> ClassMoments:
    t = pq.read_table(path, columns=["embedding", "label"], filters=[("split", "=", split)])
    x, y = table_arrays(t, embedding_dim(path, pq.read_schema(path)))
    return class_moments(transform(x) if transform else x, y, num_classes, rank)


def _files_moments(paths: list[str], split: str, num_classes: int, rank: int, transform=None) -> ClassMoments:
    """Moments of several files, read one at a time and merged in the tree a task per file
    would have had (`tree_reduce`), each merge into its left side's arrays."""
    return tree_reduce((_shard_moments(p, split, num_classes, rank, transform) for p in paths),
                         lambda a, b: merge(a, b, into_a=True))


def group_size(n: int, tasks: int) -> int:
    """Files per task: the smallest power of two that makes at most `tasks` groups of n files."""
    size = 1
    while -(-n // size) > max(tasks, 1):
        size *= 2
    return size


def reduce_moments(files: list[str], num_classes: int, rank: int = 16, split: str = "train", transform=None,
                   blocks: BlockCache | None = None, in_process: bool | None = None) -> ClassMoments:
    """Moments of one split of Parquet embedding files: one Ray task per aligned group of files
    (about one group per CPU of the cluster), each merging its files as it reads them, then the
    tree of merges over the groups (`block_tree`).

    A task per file left every file's moments (C x r x D float64, 0.8 GB at iNaturalist size)
    in the object store at once: the tasks finish before the merges that consume them start,
    and the store's shared memory stays at its high-water mark for the rest of the run (6 GB
    for 8 files there). Grouped, the store holds about one result per CPU. The merges form the
    pairwise tree over the files (`tree_reduce`) on any cluster, and the roots' truncation
    depends on that tree, so one node and many give the same moments, and so do kept blocks
    (`blocks`: loaded instead of read where kept, kept once computed; raylt.latent.blocks). A
    task's process exits after it (`max_calls=1`), so its gigabytes of private memory do not
    stay in an idle worker while the head trains. `transform` (a picklable function of [N, D]
    arrays) maps embeddings first. The files are read by the tasks, so on a cluster they must be
    on shared storage. `in_process` (default: when no Ray is running) forms the same tree in
    this process instead.
    """
    files = list(files)
    if in_process if in_process is not None else not ray.is_initialized():
        return _reduce_here(files, num_classes, rank, split, transform, blocks)
    # SPREAD: the shard reads are I/O on shared storage, so every node takes its share
    # instead of the driver's node filling up first.
    group_task = ray.remote(max_calls=1)(_files_moments).options(scheduling_strategy="SPREAD")
    merge_task = ray.remote(max_calls=1)(merge)

    def kept(lo: int, hi: int):
        m = blocks.load(lo, hi)
        return ray.put(m) if m is not None else None

    parts = block_tree(len(files), lambda lo, hi: group_task.remote(files[lo:hi], split, num_classes, rank, transform),
                       merge_task.remote, group_size(len(files), cluster_cpus()),
                       kept if blocks is not None else None, blocks.present() if blocks is not None else frozenset())
    total = fold_right([ref for _, _, ref, _ in parts], merge_task.remote)
    for lo, hi, ref, was_kept in parts:  # once every task is submitted: they run meanwhile
        if blocks is not None and not was_kept and blocks.keeps(lo, hi):
            blocks.save(lo, hi, ray.get(ref))
    return ray.get(total)


def _reduce_here(files: list[str], num_classes: int, rank: int, split: str, transform,
                 blocks: BlockCache | None) -> ClassMoments:
    """`reduce_moments` in this process, over the same tree of merges (so the same moments):
    the files in one group, kept blocks loaded instead of read."""
    def join(a, b):
        return merge(a, b, into_a=True)  # a is a subtree's fresh total, held by nothing else

    parts = block_tree(len(files), lambda lo, hi: _files_moments(files[lo:hi], split, num_classes, rank, transform),
                       join, len(files), blocks.load if blocks is not None else None,
                       blocks.present() if blocks is not None else frozenset())
    for lo, hi, m, was_kept in parts:  # kept before the fold below merges into them
        if blocks is not None and not was_kept and blocks.keeps(lo, hi):
            blocks.save(lo, hi, m)
    return fold_right([m for _, _, m, _ in parts], join)


def reduce_store(store_path, num_classes: int, rank: int = 16, split: str = "train") -> ClassMoments:
    """Moments of one split of a finished embedding store."""
    return reduce_moments(list(open_embeddings(store_path).files), num_classes, rank, split)


def files_key(es: EmbeddingSet) -> str:
    """A short key of the embedding files as they are on disk (path, size, modification time)."""
    h = hashlib.sha256()
    for f in es.files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


def store_blocks(es: EmbeddingSet, rank: int, transform: str) -> BlockCache | None:
    """The kept block moments of a store's train split, in `<store.root>/moments/`, shared by
    every store under that root (a grown data set's store is a sibling of the old one); None
    for other inputs."""
    if not es.is_store:
        return None
    man = read_manifest(es.path)
    sums = man.get("checksums") or {}
    return BlockCache(es.path.parent / "moments", tuple(sums[Path(f).name] for f in es.files),
                      {"split": "train", "classes": es.num_classes, "rank": rank, "transform": transform},
                      es.class_names, last_final=int(man["num_rows"]) % int(man["inputs"]["shard_size"]) == 0)


def class_stats(es: EmbeddingSet, rank: int, transform: str, cache_dir: Path,
                ray_cfg: RayConfig | None = None) -> tuple[ClassMoments, Path]:
    """Moments of the train split (Ray reduce), cached as `class_stats-*.npz` per input; the
    moments and their file. A store's blocks of files already reduced, by it or by a store of
    the same root whose data it extends, are loaded instead of read (`store_blocks`). Ray is
    started (`ray_cfg`) only when none runs and the files are larger than `IN_PROCESS_BYTES`."""
    path = cache_dir / f"class_stats-{transform}-r{rank}-{files_key(es)}.npz"
    if path.is_file():
        try:
            moments = load_moments(path)[0]
            log.info("class statistics reused from %s", path)
            return moments, path
        except DAMAGED as e:  # a cut-short or altered file
            log.warning("class statistics %s are damaged (%s: %s): computed again", path, type(e).__name__, e)
    t0 = time.perf_counter()
    if not ray.is_initialized() and sum(os.path.getsize(f) for f in es.files) > IN_PROCESS_BYTES:
        init_ray(ray_cfg or RayConfig())
    fwd = TRANSFORMS[transform][0] if transform != "identity" else None
    blocks = store_blocks(es, rank, transform)
    m = reduce_moments(list(es.files), es.num_classes, rank, "train", fwd, blocks)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_moments(m, path, es.class_names)  # atomic, per process: parallel fits may share the cache
    kept = blocks.reused_files if blocks else 0
    log.info("class statistics of %d classes (rank %d, %s) in %.1f s%s -> %s",
             es.num_classes, rank, transform, time.perf_counter() - t0,
             f"; the moments of {kept} of {len(es.files)} files kept from {blocks.path}" if kept else "", path)
    return m, path
