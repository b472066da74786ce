"""The latent pipeline: embeddings -> class stats -> sampler -> Ray Train head -> evaluation.

`fit(cfg, embeddings, out)` runs every stage after `embed` on an `EmbeddingSet` and writes
into `out`: `class_stats.npz` (reused when present for the same inputs), Ray Train
checkpoints under `train/`, `head.npz`, `metrics.json` and `per_class.png`. `run(cfg)` embeds
the configured data set first (raylt.embed) and fits into `<train.output_dir>/<name>`.
MLflow logging goes through raylt.tracking, from the driver and from rank 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raylt.config import RayltConfig, expand_path, to_dict
from raylt.embeddings import EmbeddingSet, open_embeddings, ray_dataset, read_split
from raylt.errors import DataError
from raylt.evaluate import evaluate, plot_per_class, write_metrics
from raylt.sampling import SAMPLERS, TRANSFORMS, synthetic_counts
from raylt.stats import ClassMoments, load_moments, reduce_moments, save_moments

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    out: Path
    metrics: dict
    run_id: str | None
    model_uri: str | None


def check_names(cfg: RayltConfig) -> None:
    """Unknown sampler, head or loss names fail here, before any expensive work."""
    from raylt.heads import HEADS, LOSSES

    SAMPLERS.get(cfg.sampler.name)
    HEADS.get(cfg.head.name)
    LOSSES.get(cfg.head.loss)


def _files_key(es: EmbeddingSet) -> str:
    h = hashlib.sha256()
    for f in es.files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


def class_stats(es: EmbeddingSet, rank: int, transform: str, cache_dir: Path) -> tuple[ClassMoments, Path]:
    """Moments of the train split (Ray reduce), cached as `class_stats-*.npz` per input; the
    moments and their file."""
    path = cache_dir / f"class_stats-{transform}-r{rank}-{_files_key(es)}.npz"
    if path.is_file():
        log.info("class statistics reused from %s", path)
        return load_moments(path)[0], path
    t0 = time.perf_counter()
    fwd = TRANSFORMS[transform][0] if transform != "identity" else None
    m = reduce_moments(list(es.files), es.num_classes, rank, "train", fwd)
    tmp = path.with_suffix(".tmp.npz")
    save_moments(m, tmp, es.class_names)
    os.replace(tmp, path)  # atomic: a crashed run never leaves a half-written artifact
    log.info("class statistics of %d classes (rank %d, %s) in %.1f s -> %s",
             es.num_classes, rank, transform, time.perf_counter() - t0, path)
    return m, path


def _eval_split(es: EmbeddingSet) -> str:
    for split in ("test", "val"):
        if es.counts.get(split) is not None and es.counts[split].sum() > 0:
            return split
    raise DataError(f"embeddings under {es.path} have no 'test' or 'val' rows to evaluate on")


def fit(cfg: RayltConfig, es: EmbeddingSet, out: Path, backbone: dict | None = None, run_name: str = "fit") -> FitResult:
    from raylt import tracking
    from raylt.pyfunc import head_logits, load_head, save_head
    from raylt.ray_utils import init_ray
    from raylt.train_ray import fit_ray

    check_names(cfg)
    out.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.ray)
    spec, times = SAMPLERS.get(cfg.sampler.name), {}
    with tracking.start_run(cfg, run_name) as run:
        t0 = time.perf_counter()
        cache = es.path / "stats" if (es.path / "manifest.json").is_file() else out
        cache.mkdir(exist_ok=True)
        moments, stats_file = class_stats(es, cfg.stats.rank, spec.transform, cache) if spec.transform else (None, None)
        gaussians = spec.build(moments, cfg.sampler) if moments is not None else None
        times["stats_s"] = time.perf_counter() - t0
        syn = synthetic_counts(es.train_counts, cfg.sampler.target, gaussians.valid) if gaussians else 0 * es.train_counts
        log.info("training stream per epoch: %d real + %d synthetic embeddings, %d classes",
                 es.train_counts.sum(), syn.sum(), es.num_classes)
        init = None
        if cfg.head.text_init:
            from raylt.backbones import text_embeddings

            init = text_embeddings(cfg.backbone, list(es.class_names))
        t0 = time.perf_counter()
        import ray

        ray.data.DataContext.get_current().execution_options.preserve_order = True  # deterministic runs
        train_ds = ray_dataset(es, "train")
        val_ds = ray_dataset(es, "val") if es.counts.get("val", np.zeros(1)).sum() > 0 else None
        info = {"dim": es.dim, "num_classes": es.num_classes, "init": init, "syn_counts": syn.tolist(),
                "train_counts": es.train_counts.tolist()}
        state = fit_ray(cfg, train_ds, val_ds, gaussians, info, out, tracking.worker_target(run))
        times["train_s"] = time.perf_counter() - t0
        save_head(state, cfg.head.name, cfg.head.scale, out / "head.npz")
        split = _eval_split(es)
        x, y = read_split(es, split)
        pred = head_logits(load_head(out / "head.npz"), x).argmax(1)
        metrics = {**evaluate(pred, y, es.train_counts, es.class_names), "split": split,
                   "synthetic_per_epoch": int(syn.sum()), "seconds": {k: round(v, 3) for k, v in times.items()}}
        write_metrics(metrics, out / "metrics.json")
        plot_per_class(metrics, out / "per_class.png", f"{cfg.name}: {cfg.sampler.name} sampler, {cfg.head.loss} loss")
        uri = None
        if run is not None:
            uri = tracking.log_fit(metrics, out, stats_file, {"class_names": list(es.class_names), "backbone": backbone})
    log.info("metrics: overall %.4f, many %s, medium %s, few %s -> %s", metrics["overall"],
             *(_fmt(metrics[g]) for g in ("many", "medium", "few")), out / "metrics.json")
    return FitResult(out, metrics, run.info.run_id if run is not None else None, uri)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def baseline_config(cfg: RayltConfig) -> RayltConfig:
    """The plain CE head on real embeddings only, everything else equal."""
    return dataclasses.replace(
        cfg, sampler=dataclasses.replace(cfg.sampler, name="none"), head=dataclasses.replace(cfg.head, loss="ce")
    )


def run(cfg: RayltConfig, baseline: bool = False) -> list[FitResult]:
    """The whole pipeline: embed (or reuse the store), then fit; optionally the CE baseline too."""
    from raylt.embed import run_embed

    check_names(cfg)
    res = run_embed(cfg)
    es = open_embeddings(res.store)
    out = expand_path(cfg.train.output_dir) / cfg.name
    backbone = to_dict(cfg.backbone)
    results = [fit(cfg, es, out, backbone, run_name="run")]
    if baseline:
        results.append(fit(baseline_config(cfg), es, out / "baseline", backbone, run_name="baseline"))
    return results
