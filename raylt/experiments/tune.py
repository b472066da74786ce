"""Hyperparameter search over cached embeddings (`raylt tune`), with Ray Tune.

Input: a config, an `EmbeddingSet` and a search space: dotted config keys mapped to one
distribution each (`SPACES`), from a YAML file or `DEFAULT_SPACE`:

    sampler.target: {choice: [50, 100, 200, 400]}
    train.lr: {loguniform: [0.02, 0.5]}

Each trial is the config with the trial's values, fitted in its own Ray Tune trial (one CPU)
by `LongTailHead` (raylt.head.estimator): the one recipe (raylt.head.recipe) that `raylt fit`
runs too (post-hoc offsets, temperature and selection included), on embeddings held in
the object store once: a trial costs seconds. Trials are scored by the class-balanced accuracy
(the long-tail metric) of the `val` split, or, without one, of a stratified holdout of the
train split (`head.holdout` of each class with at least `HOLDOUT_MIN` images); ties go to the lower
val negative log-likelihood, then to the earlier trial. Test is only reported. The BNS adapter
and auxiliary classes need Ray stages of their own: a config with either on is refused
(`raylt ablate` compares them). Each trial is an MLflow child run of one parent run.

Output, in `out` and on the parent run: `tune.md` and `tune.json` (every trial: its values,
val balanced accuracy, top-1 and NLL, test overall / many / medium / few), and `best.yaml`: the
whole config with the best trial's values, named `<name>-tuned` (its own output folder) in
the same MLflow experiment, which `raylt run` and `raylt fit --config` take as it is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray.tune
import torch
import yaml
from ray import tune

from raylt import tracking
from raylt.choices import check_names
from raylt.config import RayltConfig, dump_yaml, override
from raylt.config.schema import HeadConfig
from raylt.embed.inputs import EmbeddingSet, eval_split, read_split
from raylt.errors import ConfigError, DataError
from raylt.experiments import tables
from raylt.experiments.tables import COLUMNS, cell
from raylt.head.evaluate import evaluate
from raylt.head.posthoc import HOLDOUT_MIN, holdout
from raylt.head.estimator import LongTailHead
from raylt.methods.recipes import is_on
from raylt.ops.cluster import cluster_cpus, init_ray
from raylt.ops.console import Progress
from raylt.registry import Registry

log = logging.getLogger(__name__)


SPACES: Registry[Callable[[list], Any]] = Registry("search-space distribution")


SPACES.register("choice", "one of the listed values")(tune.choice)
SPACES.register("grid", "every listed value (multiplies the trials)")(tune.grid_search)
SPACES.register("uniform", "[low, high], uniform")(lambda v: tune.uniform(*v))
SPACES.register("loguniform", "[low, high], uniform in log space")(lambda v: tune.loguniform(*v))
SPACES.register("randint", "[low, high), integers")(lambda v: tune.randint(*v))

# What moves the default recipe most (bench/head_fit.py): the synthetic budget, the shrinkage,
# the learning rate and the weight of the log prior.
DEFAULT_SPACE = {
    "sampler.target": {"choice": [50, 100, 200, 400]},
    "sampler.kappa": {"loguniform": [2.0, 100.0]},
    "train.lr": {"loguniform": [0.02, 0.5]},  # around the whitened head's default 0.1
    "head.tau": {"uniform": [0.5, 1.5]},
}


def read_space(path: Path | None) -> tuple[dict, str]:
    """The search space of a YAML file (or the default) and where it came from."""
    if path is None:
        return DEFAULT_SPACE, "the default search space"
    try:
        space = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"search space {path} cannot be read ({type(e).__name__}); "
                          "give a YAML file of `key: {{choice: [...]}}` lines") from None
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"search space {path} must map config keys to distributions, e.g. "
                          "`train.lr: {loguniform: [0.001, 0.05]}`")
    return space, str(path)


def check_space(cfg: RayltConfig, space: dict, source: str) -> dict:
    """The Ray Tune param space of `space`; unknown keys, distributions and values fail here,
    before any trial runs."""
    tune_space, probe = {}, {}
    for key, spec in space.items():
        if not (isinstance(spec, dict) and len(spec) == 1):
            raise ConfigError(f"search space {source}: {key} must be one distribution, e.g. "
                              f"`{key}: {{choice: [a, b]}}`, got {spec!r}")
        (kind, values), = spec.items()
        make = SPACES.get(kind)
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search space {source}: {key}: {kind} takes a list of values, got {values!r}")
        tune_space[key] = make(values)
        probe[key] = values[0]
    override(cfg, probe, source)  # every key exists and takes such values
    return tune_space


@dataclasses.dataclass(frozen=True)
class Data:
    """What every trial reads: train, validation and test arrays."""

    x: np.ndarray
    y: np.ndarray
    xv: np.ndarray
    yv: np.ndarray
    xt: np.ndarray | None
    yt: np.ndarray | None
    counts: np.ndarray
    class_names: tuple[str, ...]
    val_from: str  # "val", or "holdout" of the train split


def prepare(cfg: RayltConfig, es: EmbeddingSet) -> Data:
    x, y = read_split(es, "train")
    if es.counts.get("val") is not None and es.counts["val"].sum() > 0:
        (xv, yv), val_from = read_split(es, "val"), "val"
    else:
        fraction = cfg.head.holdout or HeadConfig.holdout  # trials need rows to be scored on
        held = holdout(y, es.num_classes, cfg.seed, fraction)
        if not held.any():
            raise ConfigError(f"embeddings under {es.path} have no val split and no class with {HOLDOUT_MIN} train "
                              "images to hold out; add a val split")
        xv, yv, x, y, val_from = x[held], y[held], x[~held], y[~held], "holdout"
        log.info("tune: no val split; %d train embeddings (%.0f%% of each class with >= %d) held out to score trials",
                 held.sum(), 100 * fraction, HOLDOUT_MIN)
    try:
        xt, yt = read_split(es, eval_split(es))
    except DataError:  # no test split: trials are scored on val only
        xt = yt = None
    counts = np.bincount(y, minlength=es.num_classes)
    return Data(x, y, xv, yv, xt, yt, counts, es.class_names, val_from)


def _trial(params: dict, base: RayltConfig, data: Data, parent: str | None) -> None:
    """One Ray Tune trial: `LongTailHead` with the trial's values, the whole recipe (post-hoc
    offsets and temperature chosen on the val rows, as `raylt fit` does); scored by the val
    rows' class-balanced accuracy; an MLflow child run of `parent` with val top-1 per epoch."""
    torch.set_num_threads(1)  # one CPU per trial: trials run side by side
    cfg = override(base, plain(params), "the search space")
    name = f"trial-{ray.tune.get_context().get_trial_id()}"
    device = "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"
    est = LongTailHead.from_config(cfg, device)
    with tracking.start_run(cfg, name, parent_run_id=parent) as run:
        target = tracking.worker_target(run)

        def log(epoch: int, module, st) -> None:
            nonlocal target
            with torch.no_grad():
                z = module.eval()(torch.as_tensor(data.xv, device=device)).cpu().numpy()
            val = float((est.classes_[z.argmax(1)] == data.yv).mean())
            target = tracking.log_epoch(target, {"train_loss": st.loss, "val_top1": val}, epoch)

        est.fit(data.x, data.y, data.xv, data.yv, on_epoch=log)
        metrics = {k: float(est.fit_info_[k]) for k in ("val_balanced", "val_top1", "val_nll")}
        if data.xt is not None:
            r = evaluate(est.predict(data.xt), data.yt, data.counts, data.class_names)
            metrics.update({f"test_{k}": r[k] for k in COLUMNS if r.get(k) is not None})
        if run is not None:  # val_top1 is logged per epoch above (the head before its offsets)
            tracking.log_results({k: v for k, v in metrics.items() if k != "val_top1"}, [])
        ray.tune.report(metrics)


def best_row(rows: list[dict]) -> dict:
    """The best trial: the highest class-balanced val accuracy (the long-tail metric); ties go
    to the lower val negative log-likelihood, then to the earlier trial."""
    return min(enumerate(rows), key=lambda ir: (-ir[1]["val_balanced"], ir[1]["val_nll"], ir[0]))[1]


def tuned_config(cfg: RayltConfig, params: dict, source: str) -> RayltConfig:
    """`cfg` with the best trial's values, as `best.yaml` holds it: a run of its own
    (`<name>-tuned`, its own output folder) in the same MLflow experiment."""
    best = override(cfg, params, source)
    experiment = cfg.tracking.experiment or cfg.name
    return dataclasses.replace(best, name=f"{cfg.name}-tuned"[:128],
                               tracking=dataclasses.replace(best.tracking, uri=None, experiment=experiment))


def sweep(cfg: RayltConfig, es: EmbeddingSet, out: Path, space: dict, source: str, num_samples: int = 8,
          concurrent: int = 0) -> dict:
    """Run the search; returns {"rows": [...], "best": {...}} (also written to `out`)."""
    # Tune's own console (a settings box, a results path, a status table per interval) even
    # at verbose=0 with its newer output engine; raylt prints one table at the end.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    tune_space = check_space(cfg, space, source)
    check_names(cfg)
    check_tunable(cfg, space)
    init_ray(cfg.ray)
    out.mkdir(parents=True, exist_ok=True)
    # Trials run in other processes: they log to the parent's absolute tracking URI.
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=tracking.tracking_uri(cfg)))
    t0 = time.perf_counter()
    data = prepare(cfg, es)
    with tracking.start_run(cfg, "tune") as run:
        parent = run.info.run_id if run is not None else None
        # One CPU a trial (trials are small and run side by side), or one GPU with train.use_gpu.
        resources = {"cpu": 1, "gpu": 1 if cfg.train.use_gpu else 0}
        trainable = tune.with_resources(tune.with_parameters(_trial, base=cfg, data=data, parent=parent), resources)
        tuner = tune.Tuner(
            trainable, param_space=tune_space,
            tune_config=tune.TuneConfig(metric="val_balanced", mode="max", num_samples=num_samples,
                                        max_concurrent_trials=concurrent or cluster_cpus()),
            run_config=tune.RunConfig(name="trials", storage_path=str(out), verbose=0, callbacks=[_progress(trial_count(space, num_samples))]))
        grid = tuner.fit()
        rows = [_row(r, list(space)) for r in grid if r.metrics]
        failed = [str(r.error).splitlines()[0] for r in grid if r.error]
        if failed:
            log.warning("tune: %d trial(s) failed, e.g. %s", len(failed), failed[0])
        if not rows:
            raise ConfigError(f"every trial failed, e.g. {failed[0] if failed else 'no result'}; check the search space")
        best = best_row(rows)
        best_cfg = tuned_config(cfg, best["params"], source)
        report = {"rows": rows, "best": best, "val_from": data.val_from, "seconds": time.perf_counter() - t0}
        (out / "tune.json").write_text(json.dumps(report, indent=1))
        (out / "tune.md").write_text(markdown(rows, best) + "\n")
        (out / "best.yaml").write_text(f"# raylt tune: best of {len(rows)} trials, class-balanced val accuracy "
                                       f"{best['val_balanced']:.4f} ({data.val_from})\n" + dump_yaml(best_cfg))
        if run is not None:
            metrics = {"best_val_balanced": best["val_balanced"], "best_val_top1": best["val_top1"],
                       "trials": float(len(rows)),
                       "tune_seconds": report["seconds"]}
            metrics.update({f"best_{k}": v for k, v in best.items() if k.startswith("test_")})
            tracking.log_results(metrics, [out / "tune.md", out / "tune.json", out / "best.yaml"])
    return report


def check_tunable(cfg: RayltConfig, space: dict) -> None:
    """A config (or space) that turns on a method trials cannot fit fails in one line."""
    for method in ("adapter", "auxiliary"):
        if is_on(cfg, method) or any(k.startswith(method + ".") for k in space):
            raise ConfigError(f"raylt tune fits the head on the embeddings as they are; {method}.* needs a stage of its "
                              f"own: turn it off for the sweep ({'adapter.name=none' if method == 'adapter' else 'auxiliary.embeddings=null'}) "
                              "or compare it with `raylt ablate`")


def trial_count(space: dict, num_samples: int) -> int:
    """The trials Tune runs: `num_samples` times every combination of the `grid` keys."""
    return num_samples * math.prod(len(args) for spec in space.values() for dist, args in spec.items()
                                   if dist == "grid")


def _progress(num_samples: int):
    """A Tune callback that logs each finished trial (Tune's own reporter is off). Tune creates
    trials as slots free up, so its list holds only those started so far: count against the
    trials asked for."""
    class TrialProgress(tune.Callback):
        done = 0
        bar = None  # made at the first trial: Tune pickles its callbacks when it starts

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            if self.bar is None:
                self.bar = Progress("tune trials", num_samples, "trials", log, every=0)  # a line per trial off a terminal
            val = (trial.last_result or {}).get("val_balanced")
            what = ", ".join(f"{k}={fmt(v)}" for k, v in plain(trial.config).items())
            score = "-" if val is None else f"{val:.4f}"
            self.bar.update(self.done, note=f"last: {what}, balanced val {score}",
                            line=f"tune: trial {self.done}/{num_samples} done ({what}), balanced val {score}")

        def on_experiment_end(self, trials, **info):
            if self.bar is not None:
                self.bar.close()

    return TrialProgress()


def plain(params: dict) -> dict:
    """Trial values as Python scalars (Ray Tune draws some as numpy ones)."""
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in params.items()}


def _row(result, keys: list[str]) -> dict:
    m = result.metrics
    row = {"trial": m.get("trial_id", ""), "params": plain({k: result.config[k] for k in keys})}
    row.update({k: float(v) for k, v in m.items() if k.startswith(("val_", "test_"))})
    return row


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], best: dict) -> str:
    keys = list(rows[0]["params"])
    cols = ["val_balanced", "val_top1", *(f"test_{k}" for k in COLUMNS)]
    table = [[f"{r['trial']}{' (best)' if r is best else ''}", *(fmt(r["params"][k]) for k in keys),
              *(cell(r.get(c)) for c in cols)] for r in sorted(rows, key=lambda r: (-r["val_balanced"], r["val_nll"]))]
    return tables.markdown(["trial", *keys, *cols], table)
