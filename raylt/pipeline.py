"""The pipeline: embed -> class statistics -> the head's recipe (raylt.head.recipe's
`HeadRecipe`: plan, Ray Train epochs, post-hoc offsets and temperature) -> evaluation -> MLflow.

`run(cfg)` embeds the configured data set (or reuses its store) and fits into
`<train.output_dir>/<name>`. `fit(cfg, embeddings, out)` runs every stage after `embed` on an
`EmbeddingSet` and writes into `out`: `class_stats-*.npz` (reused when present for the same
inputs), Ray Train checkpoints under `train/`, `head.npz`, `metrics.json`, `per_class.png`, and
`config.yaml` with `run.json` (what `raylt log` needs). One fit at a time holds `out`
(`out/.lock`). This is the only module that knows the order of the stages; each line of
`_fit_locked` is one stage. MLflow logging goes through raylt.tracking, from the driver and
from rank 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raylt import tracking
from raylt.config import RayltConfig, expand_path, to_dict
from raylt.embed.class_text import CLASS_TEXT_FILE
from raylt.embed.inputs import EmbeddingSet, eval_split, open_embeddings, read_split
from raylt.embed.stage import run_embed
from raylt.head.artifact import HeadArtifact
from raylt.head.calibration import expected_calibration_error
from raylt.head.evaluate import evaluate, plot_per_class, write_metrics
from raylt.head.fit_ray import fit_ray, head_job, workers_of
from raylt.head.recipe import HeadRecipe
from raylt.head.text import zero_shot_head
from raylt.head.rows import head_rows, held_rows, initial_weights, target_text
from raylt.latent.stats_ray import class_stats, files_key
from raylt.longtail import GROUPS
from raylt.methods.bns_ray import adapt
from raylt.methods.recipes import baseline_config, is_on, recipe_label
from raylt.ops.cluster import join_cluster
from raylt.ops.locks import file_lock
from raylt.ops.trainer import RowSource
from raylt.preflight import check_fit, check_fits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    out: Path
    metrics: dict
    run_id: str | None
    model_uri: str | None


def run(cfg: RayltConfig, baseline: bool = False, out: Path | None = None) -> list[FitResult]:
    """The whole pipeline: embed (or reuse the store), then fit into `out` (default
    `<train.output_dir>/<name>`); optionally the CE baseline too, into `out/baseline`."""
    out = out or expand_path(cfg.train.output_dir) / cfg.name
    check_fits(cfg, out, baseline)  # before hours of embedding, not after
    es = embedded(cfg)
    results = [fit(cfg, es, out, run_name="run")]
    if baseline:
        results.append(fit(baseline_config(cfg), es, out / "baseline", run_name="baseline"))
    return results


def embedded(cfg: RayltConfig) -> EmbeddingSet:
    """The config's data set embedded (or its store reused), carrying this config's backbone:
    how the logged model embeds new images."""
    return dataclasses.replace(open_embeddings(run_embed(cfg).store), backbone=to_dict(cfg.backbone))


def fit(cfg: RayltConfig, es: EmbeddingSet, out: Path, run_name: str = "fit",
        parent_run_id: str | None = None, class_text: np.ndarray | None = None) -> FitResult:
    """Every stage after `embed` on `es`, into `out`; `class_text` [C, D] the classes' text
    embeddings (default: the store's backbone's text tower, where it has one)."""
    check_fit(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    # One run per output folder: two would share Ray Train's checkpoints and the results.
    with file_lock(out / ".lock", f"output folder {out}", wait=False,
                   hint="wait for that run to end, or pick another `name` (or --out)"):
        metrics, run_id, uri = _fit_locked(cfg, es, out, run_name, parent_run_id, class_text)
    zs = metrics.get("zero_shot")
    log.info("metrics: overall %.4f, many %s, medium %s, few %s%s -> %s", metrics["overall"],
             *(_fmt(metrics[g]) for g in ("many", "medium", "few")),
             f" (zero-shot CLIP: overall {zs['overall']:.4f}, few {_fmt(zs['few'])})" if zs else "", out / "metrics.json")
    return FitResult(out, metrics, run_id, uri)


def _fit_locked(cfg: RayltConfig, raw: EmbeddingSet, out: Path, run_name: str,
                parent_run_id: str | None, class_text: np.ndarray | None) -> tuple[dict, str | None, str | None]:
    join_cluster(cfg.ray, cfg.train.num_workers)
    times: dict[str, float] = {}
    est = HeadRecipe.from_config(cfg, "cuda" if cfg.train.use_gpu else "cpu")
    with tracking.start_run(cfg, run_name, parent_run_id) as run:
        target = tracking.worker_target(run)
        es, adapter = raw, None  # the logged model takes raw embeddings: it is evaluated on them
        if is_on(cfg, "adapter"):
            with _timed(times, "adapter_s"):
                es, adapter = adapt(cfg, raw, files_key(raw), out, target)
        with _timed(times, "stats_s"):
            moments, stats_file = _class_statistics(cfg, est, es, out)
        tracking.record_run(cfg, out, run, run_name, stats_file,
                            {"class_names": list(raw.class_names), "backbone": raw.backbone})
        with _timed(times, "train_s"):
            workers = workers_of(cfg)
            rows = head_rows(cfg, es, adapter, workers)
            text = target_text(cfg, raw, class_text)
            if text is not None:  # beside the head, and logged with it: what its prior and ensemble used
                np.save(out / CLASS_TEXT_FILE, text)
            init = initial_weights(cfg, rows.names)
        with _timed(times, "holdout_s"):
            chosen = _holdout_choices(cfg, est, es, out, workers, text, init, adapter is not None, rows)
        with _timed(times, "train_s"):
            plan = est.plan(moments, es.train_counts, es.dim, rows.real_counts, init, rows.neighbours, text)
            del moments  # the views on the reduce's result: only what is built from them is kept
            log.info("training stream per epoch: %d real + %d synthetic embeddings, %d classes (%d auxiliary)",
                     plan.real_counts.sum(), plan.syn_counts.sum(), plan.num_classes,
                     plan.num_classes - plan.num_targets)
            val = RowSource(es.files, es.dim, "val") if _has(es, "val") else None
            state = fit_ray(cfg, head_job(est, plan, list(rows.sources), rows.steps, val, target, workers), out)
        art, chosen = est.finish(state, plan, _tuning_split(raw), adapter, no_val=_NO_VAL, chosen=chosen)
        art.save(out / "head.npz")
        extra = {**rows.metrics, "real_per_epoch": int(plan.real_counts.sum()),
                 "synthetic_per_epoch": int(plan.syn_counts.sum()), **chosen}
        metrics = {**_evaluate(raw, art), **extra, "seconds": {k: round(v, 3) for k, v in times.items()}}
        if text is not None:  # the floor: zero-shot CLIP on the same split, from the same class text
            zs = _evaluate(raw, zero_shot_head(text))
            metrics["zero_shot"] = {k: zs[k] for k in ("overall", *GROUPS)}
        write_metrics(metrics, out / "metrics.json")
        plot_per_class(metrics, out / "per_class.png", f"{cfg.name}: {recipe_label(cfg)}")
        uri = tracking.log_fit(metrics, out) if run is not None else None
    return metrics, run.info.run_id if run is not None else None, uri


def _class_statistics(cfg: RayltConfig, est: HeadRecipe, es: EmbeddingSet, out: Path):
    """({transform: class moments of the train split} that the estimator's plan needs, the
    class statistics file), cached beside a store (or in `out` for other inputs)."""
    cache = es.path / "stats" if es.is_store else out
    moments, stats_file = {}, None
    for transform in est.statistics(cfg):
        cache.mkdir(exist_ok=True)
        moments[transform], file = class_stats(es, cfg.stats.rank, transform, cache, cfg.ray)
        stats_file = stats_file or file
    return moments, stats_file


_NO_VAL = "off: no val split apart from the evaluation split, and no holdout"


def _holdout_choices(cfg: RayltConfig, est: HeadRecipe, es: EmbeddingSet, out: Path, workers: int,
                     text, init, adapted: bool, rows) -> dict | None:
    """Without a val split: the post-hoc tau, temperature and ensemble weight chosen on a
    fit of the same recipe (through Ray Train, checkpoints in `out/holdout`) that holds out
    `head.holdout` of each train class with 5+ embeddings; None when there is a val split,
    nothing to choose, or no holdout."""
    if _has_tuning_split(es) or not est.chooses(text):
        return None
    if rows.neighbours is not None:  # auxiliary rows are chosen against all of the train split
        log.info("holdout: off with auxiliary classes; post-hoc choices need a val split")
        return None
    x, y = read_split(es, "train")
    held = est.held_out(y, es.num_classes)
    if held is None:
        log.info("holdout: off (head.holdout %g, or no class with 5 train embeddings)", cfg.head.holdout)
        return None
    log.info("holdout: no val split; %d train embeddings (%g of each class with 5+) held out to choose the "
             "post-hoc offsets, temperature and ensemble weight, then the head is fitted on all of them",
             held.sum(), cfg.head.holdout)
    if adapted:  # the ensemble is off after an adapter (HeadRecipe.finish): nothing to choose for it
        est = HeadRecipe(**{**est.get_params(), "text_ensemble": False})
    (kx, ky), val = (x[~held], y[~held]), (x[held], y[held])
    del x, y  # the driver holds the train split once
    part = held_rows(cfg, kx, ky, es.num_classes, workers)
    plan = est.plan(est.moments_of(kx, ky, es.num_classes), np.bincount(ky, minlength=es.num_classes), es.dim,
                    part.real_counts, init, None, text)
    del kx, ky
    state = fit_ray(cfg, head_job(est, plan, list(part.sources), part.steps, None, None, workers), out / "holdout")
    _, info = est.finish(state, plan, val, val_name="the holdout")
    return {**est.held_choices(info), "holdout_rows": int(held.sum())}


def _has(es: EmbeddingSet, split: str) -> bool:
    return es.counts.get(split, np.zeros(1)).sum() > 0


def _has_tuning_split(es: EmbeddingSet) -> bool:
    """A val split apart from the evaluation split: choosing on the split that is reported
    would flatter it."""
    return _has(es, "val") and eval_split(es) != "val"


def _tuning_split(es: EmbeddingSet):
    """(embeddings, labels) of the val split the offsets and the temperature are chosen on, or None."""
    return read_split(es, "val") if _has_tuning_split(es) else None


def _evaluate(es: EmbeddingSet, head: HeadArtifact) -> dict:
    """Metrics of the saved head (what the logged model predicts) on the test split, else val."""
    split = eval_split(es)
    x, y = read_split(es, split)
    logits = head.logits(x)
    return {**evaluate(logits.argmax(1), y, es.train_counts, es.class_names), "split": split,
            "ece": expected_calibration_error(logits, y)}


@contextlib.contextmanager
def _timed(times: dict, key: str):
    t0 = time.perf_counter()
    yield
    times[key] = times.get(key, 0.0) + time.perf_counter() - t0


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"
