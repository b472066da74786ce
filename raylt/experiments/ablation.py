"""Ablation: every long-tail method on the same embeddings, side by side (`raylt ablate`).

Input: a config and an `EmbeddingSet`. Each recipe of `RECIPES` changes the plain head (CE
loss, real embeddings only, nothing else) by one method, with the method's settings taken
from the config (`sampler.target`, `selection.k`, `adapter.*`, `auxiliary.*` ...); `default`
is raylt's default recipe, and `best` is composed afterwards from the single methods that
beat the plain head: the best loss, the best sampler, and each of selection, adapter and
auxiliary classes that helped on its own.

With class text (a backbone with a text tower, or `class_text`), the text recipes run and
zero-shot CLIP is a row of its own, computed on the same split by the fits that use the text;
without it they are skipped, and say so.

Every recipe is one `pipeline.fit` in its own Ray task and folder (`<out>/<recipe>/`), at
most `parallel` at a time, logged as an MLflow child run of one parent run. Output, in
`<out>` and on the parent run: `ablation.md` (the table: overall, many, medium, few, fit
seconds), `ablation.json` and `ablation.png` (grouped bars).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import ray

from raylt import tracking
from raylt.config import RayltConfig
from raylt.embed.inputs import EmbeddingSet
from raylt.errors import ConfigError
from raylt.experiments import tables
from raylt.experiments.tables import COLUMNS, accuracy_cells
from raylt.methods.recipes import baseline_config, is_on
from raylt.ops.cluster import cluster_cpus, init_ray
from raylt.pipeline import fit

log = logging.getLogger(__name__)

# recipe -> (what it shows, {config section: {field: value}} applied to the plain head)
RECIPES: dict[str, tuple[str, dict]] = {
    "ce": ("plain CE head on all real embeddings", {}),
    "logit_adjusted": ("logit-adjusted loss (Menon et al. 2021)", {"head": {"loss": "logit_adjusted"}}),
    "balanced_softmax": ("balanced softmax loss (Ren et al. 2020)", {"head": {"loss": "balanced_softmax"}}),
    "gaussian": ("calibrated Gaussian sampler", {"sampler": {"name": "gaussian"}}),
    "free_lunch": ("Free Lunch sampler (Yang et al. 2021)", {"sampler": {"name": "free_lunch"}}),
    "random_cap": ("at most k random real embeddings per class (control)", {"selection": {"name": "random_cap"}}),
    "ip_dpp": ("IP-DPP selection of k per class (arXiv 2510.08836)", {"selection": {"name": "ip_dpp"}}),
    "bns": ("BNS adapter before the head (arXiv 2510.08836)", {"adapter": {"name": "bns"}}),
    "auxiliary": ("auxiliary classes, neighbour silencing (arXiv 2410.15980)", {"auxiliary": "from_config"}),
    "posthoc": ("post-hoc offsets tau / n_c, tau chosen on val", {"head": {"posthoc": "count"}}),
    "text_prior": ("Gaussian sampler, class means shrunk toward the class text's prior",
                   {"sampler": {"name": "gaussian"}, "head": {"text_prior": True}}),
    "text_ensemble": ("zero-shot CLIP's logits added, their weight chosen on val", {"head": {"text_ensemble": True}}),
    "default": ("raylt default: Gaussian sampler (text prior) + logit adjustment + post-hoc offsets + zero-shot "
                "ensemble", {"sampler": {"name": "gaussian"}, "head": {"loss": "logit_adjusted", "posthoc": "count",
                                                                     "text_prior": True, "text_ensemble": True}}),
}
LOSS_RECIPES, SAMPLER_RECIPES = ("ce", "logit_adjusted", "balanced_softmax"), ("gaussian", "free_lunch", "text_prior")
ADD_ONS = ("ip_dpp", "bns", "auxiliary", "posthoc", "text_ensemble")
TEXT_RECIPES = ("text_prior", "text_ensemble")  # need the classes' text
# A row of the table that is no fit: the floor every recipe is held to (from a fit's metrics).
ZERO_SHOT = ("zero_shot", "zero-shot CLIP: the class names' text embeddings, no training")


def recipe_config(base: RayltConfig, changes: dict) -> RayltConfig:
    """The plain head of `base` with the sections' fields changed."""
    plain = baseline_config(base)
    for section, fields in changes.items():
        if fields == "from_config":  # the user's own section, e.g. the auxiliary corpus
            plain = dataclasses.replace(plain, **{section: getattr(base, section)})
        else:
            plain = dataclasses.replace(plain, **{section: dataclasses.replace(getattr(plain, section), **fields)})
    return plain


def best_changes(results: dict[str, dict]) -> tuple[dict, list[str]]:
    """Config changes of the best combination, and the recipes it was composed from: the best
    loss and sampler (by overall accuracy), plus each add-on that beat the plain head."""
    score = {k: v["overall"] for k, v in results.items()}
    parts = [max((r for r in LOSS_RECIPES if r in score), key=score.get)]
    samplers = [r for r in SAMPLER_RECIPES if r in score and score[r] > score["ce"]]
    parts += [max(samplers, key=score.get)] if samplers else []
    parts += [r for r in ADD_ONS if r in score and score[r] > score["ce"]]
    changes: dict = {}
    for r in parts:
        for section, fields in RECIPES[r][1].items():
            changes[section] = fields if fields == "from_config" else {**changes.get(section, {}), **fields}
    return changes, parts


def choose(names: list[str] | None, cfg: RayltConfig, has_text: bool = True) -> list[str]:
    chosen = list(names or RECIPES) + (["best"] if not names else [])
    unknown = [n for n in chosen if n not in RECIPES and n != "best"]
    if unknown:
        raise ConfigError(f"unknown ablation recipe(s) {unknown}; choose from {', '.join(RECIPES)}, best")
    skipped = [n for n in chosen if n in TEXT_RECIPES and not has_text]
    if skipped:
        log.warning("ablation: recipe(s) %s skipped: no class text (a backbone with a text tower, or --class-text)",
                    ", ".join(skipped))
        chosen = [n for n in chosen if n not in skipped]
    if "auxiliary" in chosen and not is_on(recipe_config(cfg, RECIPES["auxiliary"][1]), "auxiliary"):
        log.warning("ablation: recipe 'auxiliary' skipped: set auxiliary.embeddings to a second labelled corpus")
        chosen.remove("auxiliary")
    if "best" in chosen and "ce" not in chosen:
        raise ConfigError("the 'best' ablation recipe is composed against 'ce'; include ce in --recipes")
    return chosen


def _fit_task(cfg, es, out, name, parent, class_text=None):
    r = fit(cfg, es, out, run_name=name, parent_run_id=parent, class_text=class_text)
    return {k: r.metrics.get(k) for k in COLUMNS} | {"seconds": sum(r.metrics["seconds"].values()),
                                                    "run_id": r.run_id, "zero_shot": r.metrics.get("zero_shot")}


def _run_parallel(jobs: list[tuple[str, RayltConfig]], es: EmbeddingSet, out: Path, parent, parallel: int,
                  class_text=None):
    """Fit every (name, config) in Ray tasks, at most `parallel` at once; name -> results."""
    task = ray.remote(num_cpus=0)(_fit_task)  # it only waits: its trainer's workers hold the CPUs
    pending, results, queue = {}, {}, list(jobs)
    while queue or pending:
        while queue and len(pending) < parallel:
            name, cfg = queue.pop(0)
            pending[task.remote(cfg, es, out / name, name, parent, class_text)] = name
        done, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(done[0])
        results[name] = ray.get(done[0])
        log.info("ablation: %s done, overall %.4f", name, results[name]["overall"])
    return results


def ablate(cfg: RayltConfig, es: EmbeddingSet, out: Path, names: list[str] | None = None, parallel: int = 0,
           class_text=None) -> dict:
    """Run the recipes; the table rows (recipe -> metrics), also written to `out`.
    `class_text` [C, D]: the classes' text embeddings (default: the store's backbone's)."""
    from raylt.head.rows import target_text

    # Computed (and cached in the store) once, here, and handed to every fit.
    text = target_text(dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, text_ensemble=True)), es, class_text)
    chosen = choose(names, cfg, text is not None)
    init_ray(cfg.ray)
    if not parallel:
        # A fit keeps about two CPUs busy per train worker (the worker, plus Ray Data, the
        # controller and the driver task's evaluation and logging): on 2 CPUs, two fits at once
        # took as long as one after the other.
        parallel = max(1, cluster_cpus() // (2 * cfg.train.num_workers))
    out.mkdir(parents=True, exist_ok=True)
    # Children run in other processes: they must log to the parent's absolute tracking URI.
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=tracking.tracking_uri(cfg)))
    t0 = time.perf_counter()
    with tracking.start_run(cfg, "ablation") as run:
        parent = run.info.run_id if run is not None else None
        singles = [(n, recipe_config(cfg, RECIPES[n][1])) for n in chosen if n != "best"]
        results = _run_parallel(singles, es, out, parent, parallel, text)
        if "best" in chosen:
            changes, parts = best_changes(results)
            log.info("ablation: best combination of %s", " + ".join(parts))
            results |= _run_parallel([("best", recipe_config(cfg, changes))], es, out, parent, 1, text)
            results["best"]["from"] = parts
        rows = {n: results[n] for n in chosen}
        scores = [r.pop("zero_shot", None) for r in rows.values()]  # each fit with the text has them
        zero_shot = next((z for z in scores if z), None)
        if zero_shot:
            rows[ZERO_SHOT[0]] = {**zero_shot, "seconds": 0.0, "run_id": None}
        write_report(rows, out)
        if run is not None:
            metrics = {f"{n}.{k}": float(v[k]) for n, v in rows.items() for k in COLUMNS if v.get(k) is not None}
            tracking.log_results({**metrics, "ablation_seconds": time.perf_counter() - t0},
                                 [out / f for f in ("ablation.md", "ablation.json", "ablation.png")])
    return rows


def markdown(rows: dict) -> str:
    table = []
    for n, v in rows.items():
        what = (RECIPES[n][0] if n in RECIPES else ZERO_SHOT[1] if n == ZERO_SHOT[0] else
                "best combination: " + " + ".join(v.get("from", [])))
        table.append([n, *accuracy_cells(v), f"{v['seconds']:.0f}", what])
    return tables.markdown(["recipe", *COLUMNS, "fit s", "what"], table)


def write_report(rows: dict, out: Path) -> str:
    table = markdown(rows)
    (out / "ablation.md").write_text(table + "\n")
    (out / "ablation.json").write_text(json.dumps(rows, indent=1))
    tables.grouped_bars(rows, out / "ablation.png")
    return table
