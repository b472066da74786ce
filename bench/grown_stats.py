"""Class statistics of a grown store: `class_stats` after 2% rows appended, against a full
recompute of the same grown store in the same run.

Two embedding stores are written through `EmbeddingStore` (shards, markers, checksums, manifest),
the second holding the first's rows plus 2% more at the end, as a corpus that grows by new
shards does. The old store's statistics are computed first (they keep their blocks in
`<root>/moments/`); then the grown store's, which load the kept blocks and read only the files
after them (raylt.latent.blocks). The peer is `reduce_moments` over the grown store's files with
nothing kept. Both on the same Ray, started first (its start-up is excluded); the results are
compared value for value.

    python bench/grown_stats.py                # Places-LT size: 365 classes, 62,500 x 512, shards of 4,096
    python bench/grown_stats.py --size inat    # iNaturalist 2018 size: 8,142 classes, 437,513 x 768
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from class_stats import SIZES, profile  # noqa: E402


def write_store(root: Path, x: np.ndarray, y: np.ndarray, classes: int, shard_size: int) -> Path:
    from raylt.embed.store import EmbeddingStore

    store = EmbeddingStore.open(root, {"data": len(y), "shard_size": shard_size}, len(y))
    n = len(y)
    store.add(np.arange(n), x, np.ones(n, bool), y, np.full(n, "train", object),
              np.array([f"img/{i}" for i in range(n)], object), np.full(n, "", object))
    store.finalize(x.shape[1], {"class_names": [f"c{i}" for i in range(classes)]})
    return store.path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="places")
    ap.add_argument("--added", type=float, default=0.02, help="fraction of rows appended")
    ap.add_argument("--shard-size", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)
    import ray

    from raylt.embed.inputs import open_embeddings
    from raylt.latent.stats_ray import class_stats, reduce_moments

    classes, total, dim, head = SIZES[args.size]
    counts = profile(classes, total, head)
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(classes), counts))  # classes spread over every shard
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    x = centres[y] + 0.5 * rng.standard_normal((len(y), dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    old = int(round(len(y) / (1 + args.added)))
    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        first = open_embeddings(write_store(root, x[:old], y[:old], classes, args.shard_size))
        grown = open_embeddings(write_store(root, x, y, classes, args.shard_size))
        t0 = time.perf_counter()
        class_stats(first, args.rank, "identity", Path(tmp) / "fit-old")
        t_old = time.perf_counter() - t0
        t0 = time.perf_counter()
        whole = reduce_moments(list(grown.files), classes, args.rank)
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        merged, _ = class_stats(grown, args.rank, "identity", Path(tmp) / "fit-grown")
        t_grown = time.perf_counter() - t0
        same = all(np.array_equal(getattr(merged, f), getattr(whole, f))
                   for f in ("counts", "means", "pooled", "roots", "traces"))
    ray.shutdown()
    print(f"\n{args.size}: {classes:,} classes, D={dim}, {old:,} rows then {len(y) - old:,} appended "
          f"({args.added:.0%}), shards of {args.shard_size:,} ({len(first.files)} then {len(grown.files)} files), "
          f"rank {args.rank}, {os.cpu_count()} CPUs\n")
    print("| statistics of | seconds |")
    print("|---|---|")
    print(f"| the old store (keeps its blocks) | {t_old:.2f} |")
    print(f"| the grown store, full recompute (peer) | {t_full:.2f} |")
    print(f"| the grown store, kept blocks loaded | {t_grown:.2f} |")
    print(f"\nratio to the full recompute: {t_grown / t_full:.3f}; equal value for value: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
