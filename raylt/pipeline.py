"""The pipeline: embed -> class statistics -> sampler -> Ray Train head -> post-hoc offsets ->
temperature -> evaluation -> MLflow.

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
from raylt.choices import check_names
from raylt.config import RayltConfig, expand_path, to_dict
from raylt.embed.inputs import EmbeddingSet, eval_split, open_embeddings, read_split
from raylt.embed.stage import run_embed
from raylt.head.artifact import add_to_bias, divide_logits, head_logits, load_head, save_head
from raylt.head.calibration import expected_calibration_error, fit_temperature
from raylt.head.evaluate import evaluate, plot_per_class, write_metrics
from raylt.head.fit_ray import fit_ray
from raylt.head.modules import HEADS
from raylt.head.posthoc import choose_tau, offsets
from raylt.head.rows import head_inputs
from raylt.head.whiten import head_whitening
from raylt.latent.sampling import SAMPLERS
from raylt.latent.stats_ray import class_stats, files_key
from raylt.methods.bns_ray import adapt
from raylt.methods.recipes import baseline_config, is_on, recipe_label
from raylt.ops.cluster import init_ray
from raylt.ops.locks import file_lock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    out: Path
    metrics: dict
    run_id: str | None
    model_uri: str | None


def run(cfg: RayltConfig, baseline: bool = False) -> list[FitResult]:
    """The whole pipeline: embed (or reuse the store), then fit; optionally the CE baseline too."""
    check_names(cfg)
    tracking.check_reachable(cfg)  # before hours of embedding, not after
    es = embedded(cfg)
    out = expand_path(cfg.train.output_dir) / cfg.name
    results = [fit(cfg, es, out, run_name="run")]
    if baseline:
        results.append(fit(baseline_config(cfg), es, out / "baseline", run_name="baseline"))
    return results


def embedded(cfg: RayltConfig) -> EmbeddingSet:
    """The config's data set embedded (or its store reused), carrying this config's backbone:
    how the logged model embeds new images."""
    return dataclasses.replace(open_embeddings(run_embed(cfg).store), backbone=to_dict(cfg.backbone))


def fit(cfg: RayltConfig, es: EmbeddingSet, out: Path, run_name: str = "fit",
        parent_run_id: str | None = None) -> FitResult:
    check_names(cfg)
    tracking.check_reachable(cfg)
    out.mkdir(parents=True, exist_ok=True)
    # One run per output folder: two would share Ray Train's checkpoints and the results.
    with file_lock(out / ".lock", f"output folder {out}", wait=False,
                   hint="wait for that run to end, or pick another `name` (or --out)"):
        metrics, run_id, uri = _fit_locked(cfg, es, out, run_name, parent_run_id)
    log.info("metrics: overall %.4f, many %s, medium %s, few %s -> %s", metrics["overall"],
             *(_fmt(metrics[g]) for g in ("many", "medium", "few")), out / "metrics.json")
    return FitResult(out, metrics, run_id, uri)


def _fit_locked(cfg: RayltConfig, raw: EmbeddingSet, out: Path, run_name: str,
                parent_run_id: str | None) -> tuple[dict, str | None, str | None]:
    init_ray(cfg.ray)
    times: dict[str, float] = {}
    with tracking.start_run(cfg, run_name, parent_run_id) as run:
        target = tracking.worker_target(run)
        es, adapter = raw, None  # the logged model takes raw embeddings: it is evaluated on them
        if is_on(cfg, "adapter"):
            with _timed(times, "adapter_s"):
                es, adapter = adapt(cfg, raw, files_key(raw), out, target)
        with _timed(times, "stats_s"):
            gaussians, whiten, stats_file = _class_statistics(cfg, es, out)
        tracking.record_run(cfg, out, run, run_name, stats_file,
                            {"class_names": list(raw.class_names), "backbone": raw.backbone})
        with _timed(times, "train_s"):
            train, val, info, extra = head_inputs(cfg, es, gaussians, adapter)
            info["whiten"] = whiten
            state = fit_ray(cfg, train, val, gaussians, info, out, target)
        save_head(state, cfg.head.name, cfg.head.scale, out / "head.npz", num_targets=es.num_classes, adapter=adapter)
        extra.update(_after_training(cfg, raw, out / "head.npz"))
        metrics = {**_evaluate(raw, out / "head.npz"), **extra, "seconds": {k: round(v, 3) for k, v in times.items()}}
        write_metrics(metrics, out / "metrics.json")
        plot_per_class(metrics, out / "per_class.png", f"{cfg.name}: {recipe_label(cfg)}")
        uri = tracking.log_fit(metrics, out) if run is not None else None
    return metrics, run.info.run_id if run is not None else None, uri


def _class_statistics(cfg: RayltConfig, es: EmbeddingSet, out: Path):
    """(calibrated Gaussians or None, the whitened head's Whitening or None, the class
    statistics file): both from the train split's moments, cached beside a store (or in `out`
    for other inputs). The whitening is of the raw embeddings, whatever space the sampler's
    statistics live in."""
    spec, whitened = SAMPLERS.get(cfg.sampler.name), HEADS.get(cfg.head.name).whitened
    cache = es.path / "stats" if es.is_store else out
    gaussians = whiten = stats_file = None
    for transform in [t for t in dict.fromkeys([spec.transform, "identity" if whitened else None]) if t]:
        cache.mkdir(exist_ok=True)
        # The moments are views on the reduce's result in the object store (0.85 GB at
        # iNaturalist size): only what is built from them is kept.
        moments, file = class_stats(es, cfg.stats.rank, transform, cache)
        stats_file = stats_file or file
        if transform == spec.transform:
            gaussians = spec.build(moments, cfg.sampler)
        if transform == "identity":
            whiten = head_whitening(cfg.head, moments)
        del moments
    return gaussians, whiten, stats_file


def _after_training(cfg: RayltConfig, es: EmbeddingSet, head_file: Path) -> dict:
    """The saved head's post-hoc offsets (raylt.head.posthoc), then its temperature
    (raylt.head.calibration), each chosen on the val split and folded into `head.npz`; what
    was done, for metrics.json."""
    f = offsets(cfg.head.posthoc, es.train_counts)
    needs_val = (f is not None and cfg.head.posthoc_tau is None) or cfg.head.calibrate
    val = _tuning_split(es, head_file) if needs_val else None
    out = {}
    if f is not None:
        out.update(_posthoc(cfg, f, val, head_file))
        if isinstance(val, tuple):  # the val logits of the head as now saved, offsets included
            val = (val[0] + out["posthoc_tau"] * f, val[1])
    if cfg.head.calibrate:
        out.update(_calibrate(val, head_file))
    return out


def _tuning_split(es: EmbeddingSet, head_file: Path):
    """(the saved head's logits on the val split, its labels), or why settings cannot be chosen
    on one: choosing on the split that is reported would flatter it."""
    if es.counts.get("val", np.zeros(1)).sum() == 0 or eval_split(es) == "val":
        return "off: no val split apart from the evaluation split"
    x, y = read_split(es, "val")
    return head_logits(load_head(head_file), x), y


def _posthoc(cfg: RayltConfig, f: np.ndarray, val, head_file: Path) -> dict:
    tau, source = cfg.head.posthoc_tau, "config"
    if tau is None and isinstance(val, str):
        tau, source = 0.0, val
        log.info("post-hoc %s offsets off: no val split to choose tau on apart from the evaluation split; "
                 "set head.posthoc_tau, or add a val split", cfg.head.posthoc)
    elif tau is None:
        tau, scores = choose_tau(val[0], val[1], f)
        source = "val"
        log.info("post-hoc %s offsets: tau %g on the val split (balanced top-1 %.4f, %.4f without)",
                 cfg.head.posthoc, tau, scores[tau], scores[0.0])
    add_to_bias(head_file, tau * f)
    return {"posthoc": cfg.head.posthoc, "posthoc_tau": float(tau), "posthoc_from": source}


def _calibrate(val, head_file: Path) -> dict:
    if isinstance(val, str):
        log.info("temperature off: no val split to fit it on apart from the evaluation split")
        return {"temperature": 1.0, "temperature_from": val}
    t = fit_temperature(val[0], val[1])
    divide_logits(head_file, t)
    log.info("temperature %.3f fitted on the val split", t)
    return {"temperature": t, "temperature_from": "val"}


def _evaluate(es: EmbeddingSet, head_file: Path) -> dict:
    """Metrics of the saved head (what the logged model predicts) on the test split, else val."""
    split = eval_split(es)
    x, y = read_split(es, split)
    logits = head_logits(load_head(head_file), x)
    return {**evaluate(logits.argmax(1), y, es.train_counts, es.class_names), "split": split,
            "ece": expected_calibration_error(logits, y)}


@contextlib.contextmanager
def _timed(times: dict, key: str):
    t0 = time.perf_counter()
    yield
    times[key] = time.perf_counter() - t0


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"
