"""Synthetic sampling against the head step it feeds, one run.

For each size, class statistics of CLIP-like long-tailed embeddings (raylt.testing.simulate) are
calibrated into the default recipe's Gaussians, and on the same batch of labels the bench
times (a) `GaussianSampler.sample`, the draw each train worker makes per step, and (b) one step
of the head that consumes them: forward, logit-adjusted loss, backward and AdamW, on a batch
of the same size. Batch sizes: the synthetic share of one training step under the default
recipe (sampler.target 200, train.batch_size 256) and a fixed 1,024. A second table times the
sampler's low-rank term alone, raylt's `embedding_bag` against the same sum written as a sparse
[B, C r] coefficient matrix times the stacked roots (the formulation raylt used before).

    python bench/sampling.py                  # Places-LT size (365 x 512) and iNaturalist size (8,142 x 768)
    python bench/sampling.py --size places
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raylt.config import RayltConfig  # noqa: E402
from raylt.head.loop import make_optimizer  # noqa: E402
from raylt.head.modules import build_head, build_loss  # noqa: E402
from raylt.latent.sampling import GaussianSampler, build_gaussians, synthetic_counts  # noqa: E402
from raylt.latent.stats import class_moments  # noqa: E402
from raylt.testing.simulate import LatentSpec, clip_like, inat_like_profile, places_lt_profile  # noqa: E402

SIZES = {"places": (places_lt_profile, 512), "inat": (inat_like_profile, 768)}


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch allocations, thread pools
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def sparse_lowrank(sampler: GaussianSampler, labels: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    b, r = len(labels), sampler.rank
    cols = sampler.sources[labels].clamp(min=0)[..., None] * r + torch.arange(r)
    rows = torch.arange(b)[:, None, None].expand_as(cols)
    coef = torch.sparse_coo_tensor(torch.stack([rows.reshape(-1), cols.reshape(-1)]), g.reshape(-1),
                                   (b, sampler.roots.shape[0]), check_invariants=False)
    return torch.sparse.mm(coef, sampler.roots)


def bag_lowrank(sampler: GaussianSampler, labels: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    b, r = len(labels), sampler.rank
    cols = sampler.sources[labels].clamp(min=0)[..., None] * r + torch.arange(r)
    return torch.nn.functional.embedding_bag(cols.reshape(b, -1), sampler.roots, per_sample_weights=g.reshape(b, -1),
                                             mode="sum")


def bench_size(name: str, repeats: int) -> None:
    profile, dim = SIZES[name]
    counts = profile()
    cfg = RayltConfig()
    x, y, _ = clip_like(counts, eval_per_class=0, spec=LatentSpec(dim=dim), splits=())
    g = build_gaussians("gaussian", class_moments(x, y, len(counts), cfg.stats.rank), cfg.sampler)
    del x, y
    syn = synthetic_counts(counts, cfg.sampler.target, g.valid)
    steps = math.ceil(counts.sum() / cfg.train.batch_size)
    share = math.ceil(syn.sum() / steps)
    sampler = GaussianSampler(g)
    head = build_head("linear", dim, len(counts), cfg.head.scale)
    loss_fn = build_loss("logit_adjusted", counts + syn, cfg.head.tau)
    opt, _ = make_optimizer(head, cfg.train)
    labels_all = np.repeat(np.arange(len(counts)), syn)
    rng = np.random.default_rng(0)
    print(f"\n{name}: {len(counts)} classes, D={dim}, {syn.sum():,} synthetic per epoch, "
          f"{steps} steps, {share} synthetic per step\n")
    step_rows, term_rows = [], []
    for b in (share, 1024):
        labels = torch.as_tensor(rng.choice(labels_all, b))
        gen = torch.Generator().manual_seed(0)
        xb = sampler.sample(labels, gen)

        def step(xb=xb, labels=labels):
            loss = loss_fn(head(xb), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t_sample = best_of(lambda: sampler.sample(labels, gen), repeats)  # noqa: B023
        t_step = best_of(step, repeats)
        step_rows.append(f"| {b} | {t_sample * 1e3:.2f} | {b / t_sample:,.0f} | {t_step * 1e3:.2f} | "
                         f"{b / t_step:,.0f} | {t_sample / t_step:.2f} |")
        g = torch.randn(b, *sampler.sources.shape[1:], sampler.rank)
        assert torch.allclose(bag_lowrank(sampler, labels, g), sparse_lowrank(sampler, labels, g), atol=1e-5)
        t_bag = best_of(lambda: bag_lowrank(sampler, labels, g), repeats)  # noqa: B023
        t_sparse = best_of(lambda: sparse_lowrank(sampler, labels, g), repeats)  # noqa: B023
        term_rows.append(f"| {b} | {t_bag * 1e3:.2f} | {t_sparse * 1e3:.2f} | {t_sparse / t_bag:.2f}x |")
    print("| batch | sample ms | samples/s | head step ms | rows/s | sampling / step |\n|---|---|---|---|---|---|")
    print("\n".join(step_rows))
    print("\n| batch | low-rank term, embedding_bag ms | sparse matrix product ms | speed-up |\n|---|---|---|---|")
    print("\n".join(term_rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), action="append")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.size or ["places", "inat"]:
        bench_size(name, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
