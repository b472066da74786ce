"""Head fitting on a Places-LT-sized embedding set: raylt's recipe against its peers, one run.

Data: generated long-tailed embeddings (raylt.testing.simulate), by default from both of its
structurally different generators (`clip_like`, `heavy_tailed`), with the real Places-LT train
profile (365 classes, 62,500 images, read from ../shared/datasets/places_lt when present),
D = 512, 100 test images per class and 20 val images per class (on which the post-hoc offsets'
tau and the temperature are chosen: raylt.head.posthoc, raylt.head.calibration). Peers, on the
same embeddings:
- the plain CE head trained on the balanced twin (the same class distributions and test set,
  a balanced train split of the same size): the reference; every raylt row reports the
  fraction of the long-tail -> balanced gap it closes, (recipe - CE) / (CE on twin - CE),
  overall and for the few-shot classes;
- scikit-learn LogisticRegression (lbfgs, multinomial), plain and class_weight="balanced";
- the closed-form shared-covariance Gaussian head (LDA) from the same class statistics,
  with a uniform prior (the test set is balanced);
- with class names (`--text`): zero-shot CLIP (the floor), GDA (the LDA plus the zero-shot
  logits, their weight chosen on val: Wang et al., ICLR 2024), and a LIFT-style head-only
  baseline (Shi et al., ICML 2024, without its adapters: a cosine head initialised at the text
  classifier, scale 25, logit-adjusted loss, SGD with momentum for 10 epochs of 128 rows, its
  learning rate chosen on val from 0.001-0.03); raylt with class text is the default recipe
  given the text, with val and, as most data sets come, without it (its choices then made on a
  holdout of the train split, then refitted).
raylt rows time `raylt.LongTailHead.fit` in this process (`--device cuda` on a GPU): statistics,
calibration, head training, the offsets' tau and the temperature, after one untimed warm-up fit; the default's time is
the median of three fits. Ray adds a fixed start-up that is not the method's cost.

    python bench/head_fit.py                              # full size, both generators
    python bench/head_fit.py --scale 0.2                  # a fifth of the images, for a quick look
    python bench/head_fit.py --generator heavy_tailed     # one generator

`--end-to-end` adds the command as a user types it, `python -m raylt fit` on the same rows
written as one Parquet file (train, val, test; with `--class-text` where names are given): its
wall time includes the interpreter, the imports, the class statistics, Ray Train (local mode),
the evaluation and MLflow's logging with the model; the ratio to balanced LogisticRegression
is printed beside the core's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raylt.config import load_config  # noqa: E402
from raylt.head.evaluate import evaluate  # noqa: E402
from raylt.head.text import ensemble_weights, zero_shot_logits  # noqa: E402
from raylt.head.posthoc import balanced_accuracy  # noqa: E402
from raylt.testing.simulate import GENERATORS, TEXT_SETTINGS, LatentSpec, balanced_twin, places_lt_profile  # noqa: E402


def places_counts(f: Path | None = None) -> np.ndarray:
    f = f or ROOT.parent / "shared" / "datasets" / "places_lt" / "Places_LT_train.txt"
    if not f.is_file():
        print(f"{f} not found: using the approximate Places-LT profile")
        return places_lt_profile()
    labels = np.array([int(line.split()[1]) for line in f.read_text().splitlines() if line.strip()])
    return np.bincount(labels)


def lda_head(m, ridge: float = 1e-3):
    """W = S^-1 mu_c, b = -mu_c S^-1 mu_c / 2 (uniform prior), S the pooled covariance."""
    s = m.pooled_covariance()
    s = s + ridge * np.trace(s) / len(s) * np.eye(len(s))
    w = np.linalg.solve(s, m.means.T).T
    return lambda x: x @ w.T - 0.5 * np.einsum("cd,cd->c", w, m.means)


def lift_head(x, y, counts, text, lr: float, scale: float = 25.0, epochs: int = 10, batch: int = 128, seed: int = 0):
    """A LIFT-style head-only fit: unit class vectors W [C, D] started at the class text and
    trained by SGD on the logit-adjusted loss of scale * cos(x, w_c); predict with argmax x W^T."""
    import torch

    torch.manual_seed(seed)
    unit = torch.nn.functional.normalize
    w = torch.nn.Parameter(unit(torch.as_tensor(text, dtype=torch.float32), dim=1).clone())
    log_prior = torch.log(torch.as_tensor(counts / counts.sum(), dtype=torch.float32))
    opt = torch.optim.SGD([w], lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(y) // batch))
    xs, ys, g = torch.as_tensor(x), torch.as_tensor(y), torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(ys), generator=g).split(batch):
            loss = torch.nn.functional.cross_entropy(scale * xs[idx] @ unit(w, dim=1).T + log_prior, ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return unit(w.detach(), dim=1).numpy()


def command_fit(x, y, s, names, text=None) -> tuple[float, dict]:
    """(wall seconds, metrics.json) of `python -m raylt fit` on (x, y, s) written as Parquet."""
    import json
    import os
    import subprocess
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylt.testing.simulate import write_parquet

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        write_parquet(x, y, s, tmp / "emb" / "part-0.parquet", names)
        extra = []
        if text is not None:
            pq.write_table(pa.table({"label": np.arange(len(text)), "embedding": list(text.astype(np.float32))}),
                           tmp / "text.parquet")
            extra = ["--class-text", str(tmp / "text.parquet")]
        cmd = [sys.executable, "-m", "raylt", "-q", "fit", "--embeddings", str(tmp / "emb"), "--out", str(tmp / "out"),
               *extra, f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        secs = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(f"raylt fit failed:\n{done.stderr[-3000:]}")
        return secs, json.loads((tmp / "out" / "metrics.json").read_text())


def gap_closed(r: dict, plain: dict, twin: dict, key: str) -> float:
    """The fraction of the long-tail -> balanced gap a result closes: (r - plain) / (twin - plain)."""
    return (r[key] - plain[key]) / (twin[key] - plain[key])


def row(name, seconds, r, plain=None, twin=None):
    bal = np.nanmean(np.array([np.nan if a is None else a for a in r["per_class"]]))
    gaps = (f"{gap_closed(r, plain, twin, 'overall'):.2f} | {gap_closed(r, plain, twin, 'few'):.2f}"
            if plain is not None else "- | -")
    print(f"| {name} | {seconds:.1f} | {r['overall']:.4f} | {bal:.4f} | {r['many']:.4f} | {r['medium']:.4f} "
          f"| {r['few']:.4f} | {gaps} |")


def raylt_fit(x, y, xt, yt, counts, overrides, device="cpu", groups=None, val=None, edit=None, text=None):
    """(fit seconds, metrics) of a raylt recipe, `LongTailHead` of the config with `overrides`,
    trained on (x, y); many / medium / few by `groups` (default: `counts`); post-hoc offsets and
    temperature chosen on `val`. `edit(gaussians, moments, whitening, cfg)` replaces the
    calibrated Gaussians before training (bench/gap_sources.py: what the gap is made of)."""
    import dataclasses

    import torch

    from raylt.head.calibration import expected_calibration_error
    from raylt.head.estimator import LongTailHead

    class Edited(LongTailHead):
        def plan(self, moments, *args, **kwargs):
            p = super().plan(moments, *args, **kwargs)
            return dataclasses.replace(p, gaussians=edit(p.gaussians, moments.get("identity"), p.whiten, self.config()))

    est = (Edited if edit is not None else LongTailHead).from_config(load_config(None, overrides), device)
    t0 = time.perf_counter()
    est.fit(x, y, *(val if val is not None else (None, None)), class_text=text)
    if device != "cpu":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    groups = counts if groups is None else groups
    z = est.artifact_.logits(xt)
    r = evaluate(est.classes_[z.argmax(1)], yt, groups, [str(i) for i in range(len(counts))])
    t = est.fit_info_.get("temperature", 1.0)
    r.update(ece_raw=expected_calibration_error(z * t, yt), ece=expected_calibration_error(z, yt), temperature=t)
    return secs, r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the train images per class (min 1)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--profile", type=Path, help="Places-LT train split file (default: ../shared/datasets/places_lt)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sklearn", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="fits of the default recipe; its time is their median")
    ap.add_argument("--device", default="cpu", help="torch device of the raylt head fits (cuda on a GPU machine)")
    ap.add_argument("--recipe", action="append", default=[], help="extra raylt recipe as comma-separated overrides")
    ap.add_argument("--generator", action="append", help="embedding generator (repeatable; default: clip_like and "
                                                         "heavy_tailed)")
    ap.add_argument("--end-to-end", action="store_true", help="also time `python -m raylt fit` on the same rows")
    ap.add_argument("--text", default="scenes", choices=[*TEXT_SETTINGS, "none"],
                    help="the class names' text view (raylt.testing.simulate.TEXT_SETTINGS): scenes (zero-shot near "
                         "CLIP's ~65%%), species (names that say nothing), none")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    counts = np.maximum(np.round(places_counts(args.profile) * args.scale), 1).astype(np.int64)
    for generator in args.generator or ["clip_like", "heavy_tailed"]:
        GENERATORS.get(generator)
        compare(generator, counts, args)
    return 0


def compare(generator: str, counts: np.ndarray, args) -> None:
    """One table: every head on one generator's embeddings, with the balanced twin's reference."""
    import torch

    text_view = None if args.text == "none" else args.text
    (x_all, y_all, s_all), (xb, yb), *text = balanced_twin(generator, counts, 100, LatentSpec(dim=args.dim, seed=args.seed),
                                                           splits=("test", "val"), text=text_view)
    text = text[0] if text else None
    tr, te, va = s_all == "train", s_all == "test", s_all == "val"
    x, y, xt, yt = x_all[tr], y_all[tr], x_all[te], y_all[te]
    val = x_all[va][::5], y_all[va][::5]  # 20 per class, as Places-LT's val split
    names = [str(i) for i in range(len(counts))]
    print(f"\nhead fitting, generator {generator}, class names {args.text}: {len(counts)} classes, {len(y)} train embeddings ({counts.max()} "
          f"down to {counts.min()}), D={args.dim}, {len(yt)} test; {torch.get_num_threads()} torch threads, "
          f"raylt on {args.device}\n")
    print("| head | fit s | top-1 | balanced | many | medium | few | gap closed | few gap closed |")
    print("|---|---|---|---|---|---|---|---|---|")
    plain_ce = ["sampler.name=none", "head.loss=ce", "head.posthoc=none"]
    # The reference: the plain CE head on the twin, scored with the long-tail counts' groups.
    plain = raylt_fit(x, y, xt, yt, counts, plain_ce, args.device)
    twin = raylt_fit(xb, yb, xt, yt, np.bincount(yb, minlength=len(counts)), plain_ce, args.device, groups=counts)
    row("reference: plain CE head on the balanced twin", *twin)
    row("raylt real only (plain CE head)", *plain)
    if text is not None:
        row("zero-shot CLIP (class names, no training)", 0.0, evaluate(zero_shot_logits(xt, text).argmax(1), yt, counts,
                                                                       names), plain[1], twin[1])
    # One untimed fit of the default first: torch builds its kernels for the sampler's and the
    # head's shapes on first use (about a second), as a long-running worker does once.
    raylt_fit(x, y, xt, yt, counts, [], args.device, val=val)
    recipes = {"raylt default (gaussian sampler, logit-adjusted)": []}
    recipes.update({r: r.split(",") for r in args.recipe})
    results = {}
    if text is not None:
        fits = [raylt_fit(x, y, xt, yt, counts, [], args.device, val=val, text=text) for _ in range(args.repeat)]
        results["text"] = (float(np.median([f[0] for f in fits])), fits[0][1])
        row("**raylt default with class text** (text prior, zero-shot ensemble)", *results["text"], plain[1], twin[1])
        results["text, no val"] = raylt_fit(x, y, xt, yt, counts, [], args.device, text=text)
        row("raylt default with class text, no val split (holdout of train, refit)", *results["text, no val"],
            plain[1], twin[1])
        t0 = time.perf_counter()
        heads = {lr: lift_head(x, y, counts, text, lr) for lr in (0.001, 0.003, 0.01, 0.03)}
        w = max(heads.values(), key=lambda w: balanced_accuracy((val[0] @ w.T).argmax(1), val[1], len(counts)))
        row("LIFT-style head only (text-initialised cosine head, logit-adjusted loss, SGD)",
            (time.perf_counter() - t0) / len(heads), evaluate((xt @ w.T).argmax(1), yt, counts, names), plain[1], twin[1])
    for name, ov in recipes.items():
        # The default's time (the speed ratio below) is the median of --repeat fits: they give
        # the same head, and one fit's time on a shared 2-core machine varies by a second.
        fits = [raylt_fit(x, y, xt, yt, counts, ov, args.device, val=val) for _ in range(args.repeat if not ov else 1)]
        results[name] = (float(np.median([f[0] for f in fits])), fits[0][1])
        row(name, *results[name], plain[1], twin[1])

    from raylt.latent.stats import class_moments

    t0 = time.perf_counter()
    lda = lda_head(class_moments(x, y, len(counts), rank=1))
    secs = time.perf_counter() - t0
    row("closed-form LDA (same class statistics)", secs, evaluate(lda(xt).argmax(1), yt, counts, names), plain[1], twin[1])
    if text is not None:  # GDA (Wang et al., ICLR 2024): the closed form plus zero-shot, weighed on val
        zv, zsv = lda(val[0]), zero_shot_logits(val[0], text)
        alphas = ensemble_weights(zv, val[0], text)
        alpha = alphas[int(np.argmax([balanced_accuracy((zv + a * zsv).argmax(1), val[1], len(counts))
                                      for a in alphas]))]
        gda = evaluate((lda(xt) + alpha * zero_shot_logits(xt, text)).argmax(1), yt, counts, names)
        row("GDA: closed-form LDA + zero-shot ensemble", time.perf_counter() - t0, gda, plain[1], twin[1])
    if args.end_to_end:
        keep = tr | te | (va & (np.cumsum(va) % 5 == 1))  # the val rows above: 20 per class
        results["command"] = command_fit(x_all[keep], y_all[keep], s_all[keep], names)
        row("`raylt fit` end to end, image only (the command: imports, Ray Train, MLflow)", *results["command"],
            plain[1], twin[1])
        if text is not None:
            results["command, text"] = command_fit(x_all[keep], y_all[keep], s_all[keep], names, text)
            row("`raylt fit --class-text` end to end", *results["command, text"], plain[1], twin[1])
    if not args.no_sklearn:
        from sklearn.linear_model import LogisticRegression

        for label, cw in (("scikit-learn LogisticRegression", None), ("scikit-learn LogisticRegression, balanced", "balanced")):
            t0 = time.perf_counter()
            lr = LogisticRegression(max_iter=200, class_weight=cw, C=10.0).fit(x, y)
            secs = time.perf_counter() - t0
            results[label] = (secs, evaluate(lr.predict(xt), yt, counts, names))
            row(label, *results[label], plain[1], twin[1])
        default, peer = results["raylt default (gaussian sampler, logit-adjusted)"], results[label]
        print(f"\nraylt default against balanced LogisticRegression: {peer[0] / default[0]:.2f}x its speed, "
              f"{100 * (default[1]['overall'] - peer[1]['overall']):+.1f} points top-1")
        for key in ("command", "command, text"):
            if key in results:
                print(f"`raylt fit`{' --class-text' if 'text' in key else ''} end to end against balanced "
                      f"LogisticRegression: {peer[0] / results[key][0]:.2f}x its speed")
    if text is not None:
        t, img = results["text"][1], results["raylt default (gaussian sampler, logit-adjusted)"][1]
        zs = evaluate(zero_shot_logits(xt, text).argmax(1), yt, counts, names)
        worst = min(t[g] - max(zs[g], plain[1][g]) for g in ("many", "medium", "few"))
        print(f"\nwith class text: {gap_closed(t, plain[1], twin[1], 'overall'):.2f} of the overall and "
              f"{gap_closed(t, plain[1], twin[1], 'few'):.2f} of the few-shot gap closed (image only: "
              f"{gap_closed(img, plain[1], twin[1], 'overall'):.2f} / {gap_closed(img, plain[1], twin[1], 'few'):.2f}); "
              f"{100 * (t['overall'] - zs['overall']):+.1f} points over zero-shot, {100 * (t['overall'] - img['overall']):+.1f} "
              f"over image only; the weakest group {100 * worst:+.1f} points against the better of zero-shot and "
              f"the plain CE head")
    d = results["raylt default (gaussian sampler, logit-adjusted)"][1]
    print(f"raylt default's test ECE: {d['ece_raw']:.4f} with its own logits, {d['ece']:.4f} after the temperature "
          f"{d['temperature']:.3f} fitted on val")


if __name__ == "__main__":
    sys.exit(main())
