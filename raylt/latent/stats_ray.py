"""Ray adapter of the class statistics: a task per group of embedding files, a tree of
merges, and the `class_stats-*.npz` cache a fit reuses.

Input: the Parquet files of an `EmbeddingSet` (on shared storage on a cluster: the tasks read
them, a group of files per CPU). Output: `ClassMoments` of one split (raylt.latent.stats), and
for a fit the file `<cache>/class_stats-<transform>-r<rank>-<files key>.npz`, written
atomically and reused by any later fit of the same files, rank and transform.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import ray

from raylt.embed.inputs import EmbeddingSet, embedding_dim, open_embeddings, table_arrays
from raylt.latent.stats import ClassMoments, class_moments, load_moments, merge, save_moments, tree_reduce
from raylt.latent.transforms import TRANSFORMS
from raylt.ops.cluster import cluster_cpus

log = logging.getLogger(__name__)


def _shard_moments(path: str, split: str, num_classes: int, rank: int, transform=None) -> ClassMoments:
    t = pq.read_table(path, columns=["embedding", "label"], filters=[("split", "=", split)])
    x, y = table_arrays(t, embedding_dim(path, pq.read_schema(path)))
    return class_moments(transform(x) if transform else x, y, num_classes, rank)


def _files_moments(paths: list[str], split: str, num_classes: int, rank: int, transform=None) -> ClassMoments:
    """Moments of several files, read one at a time and merged in the tree a task per file
    would have had (`tree_reduce`), each merge into its left side's arrays."""
    return tree_reduce((_shard_moments(p, split, num_classes, rank, transform) for p in paths),
                         lambda a, b: merge(a, b, into_a=True))


def file_groups(files: list[str], tasks: int) -> list[list[str]]:
    """`files` in at most `tasks` contiguous groups of a power-of-two size (the last may be
    shorter): aligned so that the pairwise tree over the groups' trees is the pairwise tree
    over the files, whatever `tasks` is."""
    size = 1
    while -(-len(files) // size) > max(tasks, 1):
        size *= 2
    return [files[i : i + size] for i in range(0, len(files), size)]


def reduce_moments(files: list[str], num_classes: int, rank: int = 16, split: str = "train", transform=None) -> ClassMoments:
    """Moments of one split of Parquet embedding files: one Ray task per group of files (at
    most one group per CPU of the cluster), each merging its files as it reads them, then the
    tree of merges over the groups.

    A task per file left every file's moments (C x r x D float64, 0.8 GB at iNaturalist size)
    in the object store at once: the tasks finish before the merges that consume them start,
    and the store's shared memory stays at its high-water mark for the rest of the run (6 GB
    for 8 files there). Grouped, the store holds one result per CPU. The merges form the same
    pairwise tree over the files on any cluster (`file_groups`), and the roots' truncation
    depends on that tree, so one node and many give the same moments. A task's process exits
    after it (`max_calls=1`), so its gigabytes of private memory do not stay in an idle worker
    while the head trains. `transform` (a picklable function of [N, D] arrays) maps embeddings
    first. The files are read by the tasks, so on a cluster they must be on shared storage.
    """
    # SPREAD: the shard reads are I/O on shared storage, so every node takes its share
    # instead of the driver's node filling up first.
    group_task = ray.remote(max_calls=1)(_files_moments).options(scheduling_strategy="SPREAD")
    merge_task = ray.remote(max_calls=1)(merge)
    groups = file_groups(list(files), cluster_cpus())
    # A generator of refs: each group's moments are freed once merged.
    return ray.get(tree_reduce((group_task.remote(g, split, num_classes, rank, transform) for g in groups),
                               merge_task.remote))


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


def class_stats(es: EmbeddingSet, rank: int, transform: str, cache_dir: Path) -> tuple[ClassMoments, Path]:
    """Moments of the train split (Ray reduce), cached as `class_stats-*.npz` per input; the
    moments and their file."""
    path = cache_dir / f"class_stats-{transform}-r{rank}-{files_key(es)}.npz"
    if path.is_file():
        try:
            moments = load_moments(path)[0]
            log.info("class statistics reused from %s", path)
            return moments, path
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # a cut-short or altered file
            log.warning("class statistics %s are damaged (%s: %s): computed again", path, type(e).__name__, e)
    t0 = time.perf_counter()
    fwd = TRANSFORMS[transform][0] if transform != "identity" else None
    m = reduce_moments(list(es.files), es.num_classes, rank, "train", fwd)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # per process: parallel fits may share the cache
    save_moments(m, tmp, es.class_names)
    os.replace(tmp, path)  # atomic: a crashed run never leaves a half-written artifact
    log.info("class statistics of %d classes (rank %d, %s) in %.1f s -> %s",
             es.num_classes, rank, transform, time.perf_counter() - t0, path)
    return m, path
