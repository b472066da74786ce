"""What the gap to the balanced twin is made of: the default recipe with parts of its class
statistics replaced by the balanced twin's, and with its class means shrunk toward their
neighbours', on bench/head_fit.py's data (Places-LT profile, D = 512, both generators).

Rows, each the full default recipe (sampler, head, the offsets' tau on val) on the long-tail
train split, evaluated on the same test split:
- "the twin's class means": the sampler's Gaussians centred on the means of the balanced
  twin's 171 or 172 images per class, covariances and whitening from the long tail;
- "the twin's class statistics": the Gaussians calibrated from the twin's moments (means and
  covariances), the whitening still from the long tail;
- "means shrunk toward k neighbours" (James-Stein, empirical Bayes): in the head's whitened
  space, where a class mean's error has covariance about I / (D n_c), each mean moves toward
  the mean of its k nearest classes with at least 20 images, keeping the fraction
  lam_c = t2 / (t2 + 1 / n_c) of its offset, t2 the spread of the offsets of those classes
  (their squared offsets less their own 1 / n_c).

- "posterior means under the generator's own prior" (an oracle of the prior, not of the
  means): each mean is the Bayes posterior mean given its class's long-tail images when the
  prior is known exactly: the class's super-class (read off the twin's means, which lie about
  0.1 apart within a super-class and about 0.45 across) centred on the twin's means of the
  *other* classes in it, and the spread of a class mean about that centre measured on the
  twin. In the whitened space, lam_c = t2 / (t2 + 1 / n_c) as above. No estimator of the
  means from the long-tail images can use more of what the generator put into them, so this
  row bounds what better tail means can close.

The first two and the last are oracles, not recipes: they say how much of the gap is the
tail's means and how much its covariances, and how much of the means' part the long-tail data
carries at all. The third is the estimator an oracle of means suggests.

    python bench/gap_sources.py                  # both generators
    python bench/gap_sources.py --generator clip_like
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from head_fit import places_counts, raylt_fit, row  # noqa: E402

from raylt.latent.calibrate import nearest_classes  # noqa: E402
from raylt.latent.sampling import SAMPLERS  # noqa: E402
from raylt.latent.stats import class_moments  # noqa: E402
from raylt.testing.simulate import GENERATORS, LatentSpec, balanced_twin  # noqa: E402


def shrunk_means(m, whiten, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(class means shrunk toward their k nearest well-sampled classes' mean, lam per class)."""
    t = whiten.transform.astype(np.float64)
    mu = (m.means - whiten.mean) @ t  # whitened: a mean's error has trace about 1 / n_c
    n = np.maximum(m.counts, 1).astype(np.float64)
    base = m.counts >= 20
    centre = mu[nearest_classes(mu, k, base)].mean(1)
    t2 = float(np.mean(np.maximum(((mu - centre) ** 2).sum(1)[base] - 1 / n[base], 0)))
    lam = t2 / (t2 + 1 / n)
    sh = centre + lam[:, None] * (mu - centre)
    return np.linalg.solve(t.T, sh.T).T + whiten.mean, lam


def super_classes(twin_means: np.ndarray, radius: float = 0.25) -> np.ndarray:
    """[C] super-class ids: the connected components of the classes whose (twin) means lie
    within `radius` of each other (the generators put classes of a super-class about 0.1 apart
    on the sphere and super-classes about 0.45 apart)."""
    from scipy.sparse.csgraph import connected_components

    d2 = ((twin_means[:, None, :] - twin_means[None, :, :]) ** 2).sum(-1)
    return connected_components(d2 < radius ** 2, directed=False)[1]


def posterior_means(m, whiten, twin_means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the Bayes posterior means of the long-tail classes under the prior read off the twin:
    centre = the twin means of the other classes of the super-class, spread t2 = the twin's
    squared offsets from those centres; lam per class). Classes alone in their super-class
    keep their own mean."""
    t = whiten.transform.astype(np.float64)
    mu = (m.means - whiten.mean) @ t
    tw = (twin_means - whiten.mean) @ t
    group = super_classes(twin_means)
    sums = np.zeros((group.max() + 1, tw.shape[1]))
    np.add.at(sums, group, tw)
    size = np.bincount(group)[group]
    alone = size < 2
    centre = np.where(alone[:, None], mu, (sums[group] - tw) / np.maximum(size - 1, 1)[:, None])
    t2 = float(np.mean(((tw - centre) ** 2).sum(1)[~alone]))
    n = np.maximum(m.counts, 1).astype(np.float64)
    lam = np.where(alone, 1.0, t2 / (t2 + 1 / n))
    sh = centre + lam[:, None] * (mu - centre)
    return np.linalg.solve(t.T, sh.T).T + whiten.mean, lam


def compare(generator: str, counts: np.ndarray, args) -> None:
    (x_all, y_all, s_all), (xb, yb) = balanced_twin(generator, counts, 100, LatentSpec(dim=args.dim, seed=args.seed),
                                                    splits=("test", "val"))
    tr, te, va = s_all == "train", s_all == "test", s_all == "val"
    x, y, xt, yt = x_all[tr], y_all[tr], x_all[te], y_all[te]
    val = x_all[va][::5], y_all[va][::5]
    c = len(counts)
    print(f"\n{generator}: {c} classes, {len(y)} train embeddings, D={args.dim}\n")
    print("| head | fit s | top-1 | balanced | many | medium | few | gap closed | few gap closed |")
    print("|---|---|---|---|---|---|---|---|---|")
    plain_ce = ["sampler.name=none", "head.loss=ce", "head.posthoc=none"]
    plain = raylt_fit(x, y, xt, yt, counts, plain_ce)
    twin = raylt_fit(xb, yb, xt, yt, np.bincount(yb, minlength=c), plain_ce, groups=counts)
    row("reference: plain CE head on the balanced twin", *twin)
    row("raylt real only (plain CE head)", *plain)
    tm = class_moments(xb, yb, c, 16)

    def twin_means(g, m, w, cfg):
        return dataclasses.replace(g, means=tm.means.astype(np.float32))

    def twin_stats(g, m, w, cfg):
        return SAMPLERS.get(cfg.sampler.name).build(tm, cfg.sampler)

    rows = {"raylt default": None, "oracle: the twin's class means": twin_means,
            "oracle: the twin's class statistics": twin_stats}
    for k in args.neighbours:
        def shrink(g, m, w, cfg, k=k):
            means, lam = shrunk_means(m, w, k)
            few = m.counts < 20
            print(f"  (k={k}: lam {lam[few].mean():.2f} on few-shot classes, "
                  f"{lam[(~few) & (m.counts <= 100)].mean():.2f} on medium)", file=sys.stderr)
            return dataclasses.replace(g, means=means.astype(np.float32))
        rows[f"means shrunk toward {k} neighbours (James-Stein)"] = shrink

    def posterior(g, m, w, cfg):
        means, lam = posterior_means(m, w, tm.means)
        few = m.counts < 20
        print(f"  (posterior: {super_classes(tm.means).max() + 1} super-classes, lam {lam[few].mean():.2f} on "
              f"few-shot classes, {lam[(~few) & (m.counts <= 100)].mean():.2f} on medium)", file=sys.stderr)
        return dataclasses.replace(g, means=means.astype(np.float32))
    rows["oracle: posterior means under the generator's own prior"] = posterior
    for name, edit in rows.items():
        if args.rows and not any(w in name for w in args.rows):
            continue
        row(name, *raylt_fit(x, y, xt, yt, counts, [], val=val, edit=edit), plain[1], twin[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--neighbours", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--rows", nargs="*", help="only the rows whose names contain one of these words")
    ap.add_argument("--generator", action="append", help="embedding generator (default: both)")
    args = ap.parse_args(argv)
    counts = places_counts()
    for generator in args.generator or ["clip_like", "heavy_tailed"]:
        GENERATORS.get(generator)
        compare(generator, counts, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
