"""The head's real rows (`head_rows` -> `HeadRows`): where each worker reads them, the steps
per epoch and the head's classes; and the real rows when they are chosen rather than streamed: a selection of the train
embeddings per round (raylt.methods.selection), plus auxiliary-class rows (raylt.methods.auxiliary).

Input: train embeddings [N, D] and labels [N] on the driver (selection needs a class's rows
together), optional auxiliary rows. Output: one `RowSource` per train worker: its slice of
the train split's files, or of the chosen rows' `embedding`, `label` and `keep` (bit r set:
the row is in selection round r) in the object store; and the number of steps every rank
takes in each round.

Rows are shuffled once (seeded) before they are cut into worker shards, so that every rank
sees every class; a row is never dropped. Each round r uses the selector with seed
(seed, r), so `random_cap` draws a new subset and `ip_dpp` re-scores informativeness on new
probe folds; a round covers `selection.every` epochs (all of them when 0).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from raylt.config import BackboneConfig, RayltConfig, expand_path
from raylt.embed.backbones import build_encoder, has_text_tower, text_embeddings
from raylt.embed.class_text import cached_class_text, class_text_embeddings
from raylt.embed.inputs import EmbeddingSet, open_embeddings, read_split
from raylt.errors import RayltError
from raylt.methods.auxiliary import auxiliary_rows, class_means
from raylt.methods.bns_artifact import adapter_numpy
from raylt.methods.recipes import is_on
from raylt.methods.selection import TrainRows, cuts, num_rounds, round_steps, train_rows
from raylt.ops.trainer import RowSource

log = logging.getLogger(__name__)

def shard_refs(rows: TrainRows, workers: int) -> list[RowSource]:
    """One row source per rank from the in-memory rows: its slice in the object store (or, in
    local mode, the arrays themselves)."""
    if workers == 0:
        return [RowSource(ref=(rows.x, rows.y, rows.keep), hi=len(rows.y))]
    import ray

    c = cuts(len(rows.y), workers)
    return [RowSource(ref=ray.put((rows.x[c[w]:c[w + 1]], rows.y[c[w]:c[w + 1]], rows.keep[c[w]:c[w + 1]])),
                      hi=c[w + 1] - c[w]) for w in range(workers)]


def file_shards(es: EmbeddingSet, workers: int, batch_size: int) -> tuple[list[RowSource], int]:
    """One row source per rank over the train split's files (N / workers rows each, sizes
    differing by at most one; no row is dropped) and the steps every rank takes per epoch."""
    n, ranks = int(es.train_counts.sum()), max(workers, 1)
    if n // ranks == 0:
        raise RayltError(f"{n} train embeddings cannot feed {ranks} train workers; lower train.num_workers")
    c = cuts(n, ranks)
    steps = max(1, min(math.ceil(math.ceil(n / ranks) / batch_size), n // ranks))
    return [RowSource(es.files, es.dim, "train", c[w], c[w + 1]) for w in range(ranks)], steps


@dataclass(frozen=True)
class HeadRows:
    """The head's real rows as its workers take them, and the classes they train."""

    sources: tuple[RowSource, ...]  # one per rank
    steps: int | list[int]  # real batches per epoch (per selection round), equal on every rank
    real_counts: np.ndarray  # [classes] real rows per class and epoch (targets, then auxiliary)
    names: tuple[str, ...]  # the head's classes: targets, then auxiliary
    neighbours: np.ndarray | None  # auxiliary classes' silencing mask
    metrics: dict  # what was chosen, for metrics.json


def head_rows(cfg: RayltConfig, es: EmbeddingSet, adapter: dict | None, workers: int) -> HeadRows:
    """The real rows of the head stage for `workers` Ray Train workers (0: local mode): read by
    each worker from the files, or chosen by a selector and joined by auxiliary rows."""
    rows, aux, extra = _chosen_rows(cfg, es, adapter)
    names = tuple(es.class_names) + tuple(aux.names if aux else ())
    real = rows.counts(len(names)) if rows is not None else es.train_counts
    if rows is not None:
        sources, steps = shard_refs(rows, workers), round_steps(rows, max(workers, 1), cfg.train.batch_size)
    else:
        sources, steps = file_shards(es, workers, cfg.train.batch_size)
    return HeadRows(tuple(sources), steps, np.asarray(real), names, aux.neighbours if aux else None, extra)


def held_rows(cfg: RayltConfig, x: np.ndarray, y: np.ndarray, num_classes: int, workers: int) -> HeadRows:
    """The real rows of a holdout fit (raylt.head.recipe): the train rows left after the
    holdout, from memory (without a copy unless a selection chooses among them, as in the
    full fit; every epoch shuffles them in the worker)."""
    if is_on(cfg, "selection"):
        rows = train_rows(x, y, cfg.selection.name, cfg.selection.k, num_rounds(cfg.selection.every, cfg.train.epochs),
                          cfg.seed)
    else:
        rows = TrainRows(x, y, np.ones(len(y), np.int64), 1)
    return HeadRows(tuple(shard_refs(rows, workers)), round_steps(rows, max(workers, 1), cfg.train.batch_size),
                    rows.counts(num_classes), (), None, {})


def initial_weights(cfg: RayltConfig, names) -> np.ndarray | None:
    """The head's initial weights: CLIP text embeddings of the class names (head.text_init)."""
    return text_embeddings(cfg.backbone, list(names)) if cfg.head.text_init else None


def target_text(cfg: RayltConfig, es: EmbeddingSet, given: np.ndarray | None = None) -> np.ndarray | None:
    """[C, D] CLIP text embeddings of the target classes' names, for the text prior and the
    zero-shot ensemble (head.text_prior, head.text_ensemble), from the backbone that embedded
    the store; None when both are off, for embeddings of no known backbone (the text of
    another model's tower would not match them), or for a backbone without a text tower.
    `given`: the text the user brought (`raylt fit --class-text`), used as it is."""
    if not (cfg.head.text_prior or cfg.head.text_ensemble):
        return None
    if given is not None or es.backbone is None:
        return given
    if not has_text_tower(es.backbone.get("name", "")):
        log.info("class text: the %s backbone has no text tower; the image-only recipe", es.backbone.get("name"))
        return None

    def compute(prompts) -> np.ndarray:
        log.info("class text: %d class names x %d prompts (%s) through the text tower", es.num_classes,
                 len(prompts), cfg.head.text_templates)
        encoder = build_encoder(BackboneConfig(**es.backbone))
        return class_text_embeddings(lambda t: encoder.encode_text(t).cpu().numpy(), es.class_names, prompts)

    text, path, reused = cached_class_text(es.path if es.is_store else None, es.backbone, es.class_names,
                                           cfg.head.text_templates, compute)
    if reused:
        log.info("class text: reused %s", path)
    return text


def _chosen_rows(cfg: RayltConfig, es: EmbeddingSet, adapter: dict | None):
    """(TrainRows or None, AuxiliaryPlan or None, metrics): the head's real rows when a
    selector or auxiliary classes choose them; None streams every train row instead."""
    selecting, auxiliary = is_on(cfg, "selection"), is_on(cfg, "auxiliary")
    if not selecting and not auxiliary:
        return None, None, {}
    x, y = read_split(es, "train")
    aux, ax, ay, extra = None, None, None, {}
    if auxiliary:
        aux, ax, ay = _auxiliary(cfg, es, x, y, adapter)
        extra.update(auxiliary_classes=len(aux.names), auxiliary_rows=len(ay),
                     auxiliary_synonyms_dropped=aux.dropped_synonyms)
    rounds = num_rounds(cfg.selection.every, cfg.train.epochs) if selecting else 1
    rows = train_rows(x, y, cfg.selection.name, cfg.selection.k, rounds, cfg.seed, ax, ay)
    if selecting:
        extra.update(selected_per_round=int(rows.counts(es.num_classes)[: es.num_classes].sum()), selection_rounds=rounds)
        log.info("selection %s: %d of %d train embeddings per round, %d round(s)", cfg.selection.name,
                 extra["selected_per_round"], len(y), rounds)
    return rows, aux, extra


def _auxiliary(cfg: RayltConfig, es: EmbeddingSet, x: np.ndarray, y: np.ndarray, adapter: dict | None):
    """(plan, embeddings, head labels) of the auxiliary classes' rows (raylt.methods.auxiliary)."""
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
