"""The latent pipeline: embeddings -> class stats -> sampler -> Ray Train head -> evaluation.

`fit(cfg, embeddings, out)` runs every stage after `embed` on an `EmbeddingSet` and writes
into `out`: `class_stats.npz` (reused when present for the same inputs), Ray Train
checkpoints under `train/`, `head.npz`, `metrics.json`, `per_class.png`, and `config.yaml`
with `run.json` (what `raylt log` needs). One fit at a time holds `out` (`out/.lock`). `run(cfg)` embeds
the configured data set first (raylt.embed) and fits into `<train.output_dir>/<name>`.
MLflow logging goes through raylt.tracking, from the driver and from rank 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raylt.config import RayltConfig, expand_path, to_dict
from raylt.embeddings import EmbeddingSet, open_embeddings, ray_dataset, read_split
from raylt.errors import DataError
from raylt.evaluate import evaluate, plot_per_class, write_metrics
from raylt.locks import file_lock
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
    """Unknown sampler, head, loss, selector, adapter or matcher names fail here, before any
    expensive work."""
    from raylt.adapter import ADAPTERS, BATCHES
    from raylt.auxiliary import MATCHERS
    from raylt.heads import HEADS, LOSSES
    from raylt.selection import SELECTORS

    SAMPLERS.get(cfg.sampler.name)
    HEADS.get(cfg.head.name)
    LOSSES.get(cfg.head.loss)
    SELECTORS.get(cfg.selection.name)
    ADAPTERS.get(cfg.adapter.name)
    BATCHES.get(cfg.adapter.batches)
    MATCHERS.get(cfg.auxiliary.match)


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


def _eval_split(es: EmbeddingSet) -> str:
    for split in ("test", "val"):
        if es.counts.get(split) is not None and es.counts[split].sum() > 0:
            return split
    raise DataError(f"embeddings under {es.path} have no 'test' or 'val' rows to evaluate on")


def fit(cfg: RayltConfig, es: EmbeddingSet, out: Path, backbone: dict | None = None, run_name: str = "fit",
        parent_run_id: str | None = None) -> FitResult:
    from raylt import tracking

    check_names(cfg)
    tracking.check_reachable(cfg)
    backbone = backbone or store_backbone(es)
    out.mkdir(parents=True, exist_ok=True)
    # One run per output folder: two would share Ray Train's checkpoints and the results.
    with file_lock(out / ".lock", f"output folder {out}", wait=False,
                   hint="wait for that run to end, or pick another `name` (or --out)"):
        metrics, run_id, uri = _fit_locked(cfg, es, out, backbone, run_name, parent_run_id)
    log.info("metrics: overall %.4f, many %s, medium %s, few %s -> %s", metrics["overall"],
             *(_fmt(metrics[g]) for g in ("many", "medium", "few")), out / "metrics.json")
    return FitResult(out, metrics, run_id, uri)


def store_backbone(es: EmbeddingSet) -> dict | None:
    """The backbone config an embedding store was made with (None for other inputs, and for
    stores written before the manifest kept it)."""
    import json

    manifest = es.path / "manifest.json"
    return json.loads(manifest.read_text()).get("backbone_config") if manifest.is_file() else None


def _fit_locked(cfg: RayltConfig, es: EmbeddingSet, out: Path, backbone: dict | None, run_name: str,
                parent_run_id: str | None) -> tuple[dict, str | None, str | None]:
    from raylt import tracking
    from raylt.pyfunc import head_logits, load_head, save_head
    from raylt.ray_utils import init_ray
    from raylt.train_ray import fit_ray

    init_ray(cfg.ray)
    spec, times = SAMPLERS.get(cfg.sampler.name), {}
    with tracking.start_run(cfg, run_name, parent_run_id) as run:
        target = tracking.worker_target(run)
        adapter, raw = None, es  # the logged model takes raw embeddings: it is evaluated on them
        if cfg.adapter.name != "none":
            from raylt.adapter_ray import adapt

            t0 = time.perf_counter()
            es, adapter = adapt(cfg, es, _files_key(es), out, target)
            times["adapter_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache = es.path / "stats" if (es.path / "manifest.json").is_file() else out
        cache.mkdir(exist_ok=True)
        moments, stats_file = class_stats(es, cfg.stats.rank, spec.transform, cache) if spec.transform else (None, None)
        gaussians = spec.build(moments, cfg.sampler) if moments is not None else None
        del moments  # views on the reduce's result in the object store (0.85 GB at iNaturalist size)
        times["stats_s"] = time.perf_counter() - t0
        tracking.record_run(cfg, out, run, run_name, stats_file,
                            {"class_names": list(es.class_names), "backbone": backbone})
        t0 = time.perf_counter()
        train_ds, val_ds, info, extra = _head_inputs(cfg, es, gaussians, adapter)
        state = fit_ray(cfg, train_ds, val_ds, gaussians, info, out, target)
        times["train_s"] = time.perf_counter() - t0
        save_head(state, cfg.head.name, cfg.head.scale, out / "head.npz", num_targets=es.num_classes, adapter=adapter)
        split = _eval_split(raw)
        x, y = read_split(raw, split)
        pred = head_logits(load_head(out / "head.npz"), x).argmax(1)
        metrics = {**evaluate(pred, y, es.train_counts, es.class_names), "split": split, **extra,
                   "seconds": {k: round(v, 3) for k, v in times.items()}}
        write_metrics(metrics, out / "metrics.json")
        plot_per_class(metrics, out / "per_class.png", f"{cfg.name}: {recipe_label(cfg)}")
        uri = tracking.log_fit(metrics, out) if run is not None else None
    return metrics, run.info.run_id if run is not None else None, uri


def _head_inputs(cfg: RayltConfig, es: EmbeddingSet, gaussians, adapter: dict | None):
    """(train datasets, val dataset, trainer info, metrics) of the head stage: the real rows
    (streamed, or chosen by a selector and joined by auxiliary rows), the synthetic budget per
    class, and the head's classes (targets, then auxiliary)."""
    import ray

    rows, aux, extra = _chosen_rows(cfg, es, adapter)
    c, names = es.num_classes, list(es.class_names) + list(aux.names if aux else ())
    real = rows.counts(len(names)) if rows is not None else es.train_counts
    syn = np.zeros(len(names), np.int64)
    if gaussians is not None:
        syn[:c] = synthetic_counts(real[:c], cfg.sampler.target, gaussians.valid)
    log.info("training stream per epoch: %d real + %d synthetic embeddings, %d classes (%d auxiliary)",
             real.sum(), syn.sum(), len(names), len(names) - c)
    init = None
    if cfg.head.text_init:
        from raylt.backbones import text_embeddings

        init = text_embeddings(cfg.backbone, names)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # deterministic runs
    val_ds = ray_dataset(es, "val") if es.counts.get("val", np.zeros(1)).sum() > 0 else None
    info = {"dim": es.dim, "num_classes": len(names), "num_targets": c, "init": init, "syn_counts": syn.tolist(),
            "train_counts": real.tolist(), "neighbours": aux.neighbours.tolist() if aux else None}
    if rows is not None:
        from raylt.trainset import cuts, round_steps, shard_datasets

        train_ds = shard_datasets(rows, cfg.train.num_workers)
        info["steps"] = round_steps(rows, cfg.train.num_workers, cfg.train.batch_size)
        info["rows"] = np.diff(cuts(len(rows.y), cfg.train.num_workers)).tolist()
    else:
        train_ds = ray_dataset(es, "train")
        info["train_rows"] = int(es.train_counts.sum())
    extra.update(real_per_epoch=int(real.sum()), synthetic_per_epoch=int(syn.sum()))
    return train_ds, val_ds, info, extra


def _chosen_rows(cfg: RayltConfig, es: EmbeddingSet, adapter: dict | None):
    """(TrainRows or None, AuxiliaryPlan or None, metrics): the head's real rows when a
    selector or auxiliary classes choose them; None streams every train row instead."""
    from raylt.trainset import num_rounds, train_rows

    if cfg.selection.name == "none" and not cfg.auxiliary.embeddings:
        return None, None, {}
    x, y = read_split(es, "train")
    aux, ax, ay, extra = None, None, None, {}
    if cfg.auxiliary.embeddings:
        aux, ax, ay = _auxiliary(cfg, es, x, y, adapter)
        extra.update(auxiliary_classes=len(aux.names), auxiliary_rows=len(ay),
                     auxiliary_synonyms_dropped=aux.dropped_synonyms)
    rounds = num_rounds(cfg.selection.every, cfg.train.epochs) if cfg.selection.name != "none" else 1
    rows = train_rows(x, y, cfg.selection.name, cfg.selection.k, rounds, cfg.seed, ax, ay)
    if cfg.selection.name != "none":
        extra.update(selected_per_round=int(rows.counts(es.num_classes)[: es.num_classes].sum()), selection_rounds=rounds)
        log.info("selection %s: %d of %d train embeddings per round, %d round(s)", cfg.selection.name,
                 extra["selected_per_round"], len(y), rounds)
    return rows, aux, extra


def _auxiliary(cfg: RayltConfig, es: EmbeddingSet, x: np.ndarray, y: np.ndarray, adapter: dict | None):
    from raylt.auxiliary import auxiliary_rows, class_means
    from raylt.pyfunc import adapter_numpy

    a = cfg.auxiliary
    aux_es = open_embeddings(expand_path(a.embeddings), a.class_names)
    ax, ay = read_split(aux_es, "train")
    if adapter is not None:  # the auxiliary corpus lives in the same, adapted space
        ax = adapter_numpy(adapter, ax)
    plan, rx, ry = auxiliary_rows(a, es.class_names, es.train_counts, class_means(x, y, es.num_classes), ax, ay,
                                  aux_es.class_names, cfg.backbone, cfg.seed)
    log.info("auxiliary classes: %d of %d from %s (%d near-synonyms dropped), %d images",
             len(plan.names), aux_es.num_classes, aux_es.path, plan.dropped_synonyms, len(ry))
    return plan, rx, ry


def recipe_label(cfg: RayltConfig) -> str:
    """A short name of what a config trains: the parts that differ from a plain head."""
    parts = [f"{cfg.sampler.name} sampler", f"{cfg.head.loss} loss"]
    if cfg.selection.name != "none":
        parts.append(f"{cfg.selection.name} k={cfg.selection.k}")
    if cfg.adapter.name != "none":
        parts.append(f"{cfg.adapter.name} adapter")
    if cfg.auxiliary.embeddings:
        parts.append("auxiliary classes")
    return ", ".join(parts)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def baseline_config(cfg: RayltConfig) -> RayltConfig:
    """The plain CE head on all real embeddings only, everything else equal (not registered)."""
    return dataclasses.replace(
        cfg, sampler=dataclasses.replace(cfg.sampler, name="none"), head=dataclasses.replace(cfg.head, loss="ce"),
        selection=dataclasses.replace(cfg.selection, name="none"), adapter=dataclasses.replace(cfg.adapter, name="none"),
        auxiliary=dataclasses.replace(cfg.auxiliary, embeddings=None),
        tracking=dataclasses.replace(cfg.tracking, registered_model=None),  # a comparison, not a model to serve
    )


def run(cfg: RayltConfig, baseline: bool = False) -> list[FitResult]:
    """The whole pipeline: embed (or reuse the store), then fit; optionally the CE baseline too."""
    from raylt.embed import run_embed

    from raylt import tracking

    check_names(cfg)
    tracking.check_reachable(cfg)  # before hours of embedding, not after
    res = run_embed(cfg)
    es = open_embeddings(res.store)
    out = expand_path(cfg.train.output_dir) / cfg.name
    backbone = to_dict(cfg.backbone)
    results = [fit(cfg, es, out, backbone, run_name="run")]
    if baseline:
        results.append(fit(baseline_config(cfg), es, out / "baseline", backbone, run_name="baseline"))
    return results
