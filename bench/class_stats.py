"""Class statistics: raylt's moments against a per-class `numpy.cov` loop, one run.

Peer: what a user would otherwise write, for every class `np.mean` and `np.cov` of its rows
(float64, rows gathered by a boolean mask per class), plus the pooled within-class covariance
as the count-weighted sum; the class covariances are discarded as they are made (kept, they
would take C x D x D floats: 19 GB at iNaturalist size). raylt: `raylt.latent.stats.class_moments`,
the pure core each Ray task runs on its shard (counts, means, pooled scatter, rank-r roots,
traces), and the Ray reduce over Parquet shards (`reduce_moments`), Ray start-up excluded.

    python bench/class_stats.py                      # Places-LT size: 365 classes, 62,500 x 512
    python bench/class_stats.py --size inat          # iNaturalist 2018 size: 8,142 classes, 437,513 x 768
    python bench/class_stats.py --generator heavy_tailed   # structured embeddings (raylt.testing.simulate)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raylt.latent.stats import class_moments  # noqa: E402
from raylt.longtail import exponential_profile  # noqa: E402

SIZES = {"places": (365, 62_500, 512, 4980), "inat": (8142, 437_513, 768, 1000)}


def profile(classes: int, total: int, head: int) -> np.ndarray:
    """A long tail of `classes` classes from `head` images down, scaled to about `total`."""
    counts = np.asarray(exponential_profile(head, classes, head / 2), dtype=np.float64)
    return np.maximum(np.round(counts * total / counts.sum()), 2).astype(np.int64)


def numpy_cov_loop(x: np.ndarray, y: np.ndarray, classes: int):
    d = x.shape[1]
    means = np.zeros((classes, d))
    pooled = np.zeros((d, d))
    for c in range(classes):
        xc = x[y == c].astype(np.float64)
        means[c] = xc.mean(0)
        if len(xc) > 1:
            pooled += np.cov(xc, rowvar=False) * (len(xc) - 1)
    return means, pooled


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="places")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ray", action="store_true", help="also time the Ray reduce over Parquet shards")
    ap.add_argument("--generator", help="embeddings from this raylt.testing.simulate generator (default: isotropic "
                                        "unit vectors, the range finder's worst case)")
    args = ap.parse_args(argv)
    classes, total, dim, head = SIZES[args.size]
    counts = profile(classes, total, head)
    rng = np.random.default_rng(0)
    if args.generator:
        from raylt.testing.simulate import LatentSpec, generate

        (x, y, split), _ = generate(args.generator, counts, 0, LatentSpec(dim=dim), splits=())
    else:
        y = np.repeat(np.arange(classes), counts)
        x = rng.standard_normal((len(y), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    print(f"\nclass statistics: {classes} classes, {len(y)} embeddings ({counts.max()} down to {counts.min()}), "
          f"D={dim}, rank {args.rank}\n")

    t0 = time.perf_counter()
    means, pooled = numpy_cov_loop(x, y, classes)
    peer = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = class_moments(x, y, classes, args.rank)
    ours = time.perf_counter() - t0
    assert np.allclose(m.means, means, atol=1e-6) and np.allclose(m.pooled, pooled, atol=1e-6 * len(y))
    print("| what | seconds | vs numpy.cov loop |")
    print("|---|---|---|")
    print(f"| per-class numpy.cov loop (means + pooled) | {peer:.2f} | 1.00 |")
    print(f"| raylt class_moments (+ rank-{args.rank} roots, traces) | {ours:.2f} | {peer / ours:.2f}x |")
    t0 = time.perf_counter()
    exact = class_moments(x, y, classes, args.rank, exact_roots=True)
    exact_s = time.perf_counter() - t0
    print(f"| raylt class_moments, roots by exact eigendecomposition | {exact_s:.2f} | {peer / exact_s:.2f}x |")
    big = counts > 3 * (args.rank + 10)  # the classes whose roots come from the range finder
    kept = np.einsum("crd,crd->c", m.roots, m.roots)[big] / np.einsum("crd,crd->c", exact.roots, exact.roots)[big]
    print(f"\nrange-finder roots keep {kept.min():.4f} (worst class) and {kept.mean():.4f} (mean) of the optimal "
          f"rank-{args.rank} energy over the {big.sum()} classes above {3 * (args.rank + 10)} rows")
    if args.ray:
        import ray

        from raylt.testing.simulate import write_parquet
        from raylt.latent.stats_ray import reduce_moments

        with tempfile.TemporaryDirectory() as d:
            files = []
            for i, part in enumerate(np.array_split(rng.permutation(len(y)), 8)):
                files.append(str(write_parquet(x[part], y[part], np.full(len(part), "train"), Path(d) / f"{i}.parquet")))
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
            reduce_moments(files[:1], classes, args.rank)  # warm the workers: start-up is not the method
            t0 = time.perf_counter()
            r = reduce_moments(files, classes, args.rank)
            ray_s = time.perf_counter() - t0
            ray.shutdown()
        assert np.allclose(r.means, means, atol=1e-6)
        print(f"| raylt reduce_moments on Ray (8 Parquet shards, merged) | {ray_s:.2f} | {peer / ray_s:.2f}x |")
    print(f"\nmemory of the result: raylt {m.nbytes() / 1e6:.0f} MB; the covariances the loop discards would be "
          f"{classes * dim * dim * 4 / 1e9:.1f} GB in float32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
