"""The head's inputs (`head_inputs`): its real rows, its synthetic budget per class and its
classes; and the real rows when they are chosen rather than streamed: a selection of the train
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
import ray

from raylt.config import RayltConfig, expand_path
from raylt.embed.backbones import text_embeddings
from raylt.embed.inputs import EmbeddingSet, open_embeddings, read_split
from raylt.errors import ConfigError, RayltError
from raylt.latent.sampling import synthetic_counts
from raylt.methods.auxiliary import auxiliary_rows, class_means
from raylt.methods.bns_artifact import adapter_numpy
from raylt.methods.recipes import is_on
from raylt.methods.selection import SELECTORS
from raylt.ops.trainer import RowSource

log = logging.getLogger(__name__)

MAX_ROUNDS = 63  # rounds live in the bits of one int64 per row


@dataclass(frozen=True)
class TrainRows:
    x: np.ndarray  # [M, D] float32, shuffled
    y: np.ndarray  # [M] labels, targets 0..C-1 then auxiliary classes
    keep: np.ndarray  # [M] int64 bit mask of the selection rounds each row is in
    rounds: int

    def counts(self, num_classes: int, r: int = 0) -> np.ndarray:
        """Rows per class in round r (every round keeps min(n_c, k) rows per class)."""
        return np.bincount(self.y[(self.keep >> r) & 1 == 1], minlength=num_classes)


def num_rounds(every: int, epochs: int) -> int:
    rounds = math.ceil(epochs / every) if every else 1
    if rounds > MAX_ROUNDS:
        raise ConfigError(
            f"selection.every={every} with train.epochs={epochs} makes {rounds} selection rounds; at most"
            f" {MAX_ROUNDS}: raise selection.every"
        )
    return rounds


def train_rows(x: np.ndarray, y: np.ndarray, selector: str, k: int, rounds: int, seed: int,
               aux_x: np.ndarray | None = None, aux_y: np.ndarray | None = None) -> TrainRows:
    """Selected target rows (one bit per round) and auxiliary rows (in every round), shuffled."""
    select = SELECTORS.get(selector)
    keep = np.zeros(len(y), np.int64)
    for r in range(rounds):
        rows = select(x, y, k, seed=int(np.random.SeedSequence([seed, r]).generate_state(1)[0]))
        keep[rows] |= np.int64(1) << r
    used = keep != 0  # rows no round selected never reach the workers
    x, y, keep = x[used], y[used], keep[used]
    if aux_x is not None and len(aux_x):
        x = np.concatenate([x, aux_x.astype(np.float32, copy=False)])
        y = np.concatenate([y, aux_y])
        keep = np.concatenate([keep, np.full(len(aux_y), (1 << rounds) - 1, np.int64)])
    order = np.random.default_rng([seed, 0x5E1]).permutation(len(y))
    return TrainRows(np.ascontiguousarray(x[order]), y[order], keep[order], rounds)


def cuts(n: int, workers: int) -> list[int]:
    """Row indices where the shards of `workers` ranks start (sizes differ by at most one)."""
    return [round(n * i / workers) for i in range(workers + 1)]


def round_steps(rows: TrainRows, workers: int, batch_size: int) -> list[int]:
    """Steps per round, equal on every rank: enough batches for the largest shard, but never
    more than the smallest shard has rows (a step without a real row would be empty)."""
    if len(rows.y) < workers:
        raise RayltError(f"{len(rows.y)} train rows cannot feed {workers} train workers; lower train.num_workers")
    c = cuts(len(rows.y), workers)
    steps = []
    for r in range(rows.rounds):
        bit = ((rows.keep >> r) & 1).astype(np.int64)
        per_rank = np.add.reduceat(bit, c[:-1]) if len(bit) else np.zeros(workers, np.int64)
        if per_rank.min() == 0:
            raise RayltError(
                f"selection round {r} leaves a train worker without rows ({per_rank.tolist()} per worker);"
                " lower train.num_workers"
            )
        steps.append(int(max(1, min(math.ceil(per_rank.max() / batch_size), per_rank.min()))))
    return steps


def shard_refs(rows: TrainRows, workers: int) -> list[RowSource]:
    """One row source per rank from the in-memory rows: its slice in the object store."""
    c = cuts(len(rows.y), workers)
    return [RowSource(ref=ray.put((rows.x[c[w]:c[w + 1]], rows.y[c[w]:c[w + 1]], rows.keep[c[w]:c[w + 1]])),
                      hi=c[w + 1] - c[w]) for w in range(workers)]


def file_shards(es: EmbeddingSet, workers: int, batch_size: int) -> tuple[list[RowSource], int]:
    """One row source per rank over the train split's files (N / workers rows each, sizes
    differing by at most one; no row is dropped) and the steps every rank takes per epoch."""
    n = int(es.train_counts.sum())
    if n // workers == 0:
        raise RayltError(f"{n} train embeddings cannot feed {workers} train workers; lower train.num_workers")
    c = cuts(n, workers)
    steps = max(1, min(math.ceil(math.ceil(n / workers) / batch_size), n // workers))
    return [RowSource(es.files, es.dim, "train", c[w], c[w + 1]) for w in range(workers)], steps


def head_inputs(cfg: RayltConfig, es: EmbeddingSet, gaussians, adapter: dict | None):
    """(train datasets, val dataset, trainer info, metrics) of the head stage: the real rows
    (read by each worker from the files, or chosen by a selector and joined by auxiliary rows), the synthetic budget per
    class, and the head's classes (targets, then auxiliary)."""
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
        init = text_embeddings(cfg.backbone, names)
    val = RowSource(es.files, es.dim, "val") if es.counts.get("val", np.zeros(1)).sum() > 0 else None
    info = {"dim": es.dim, "num_classes": len(names), "num_targets": c, "init": init, "syn_counts": syn.tolist(),
            "train_counts": real.tolist(), "neighbours": aux.neighbours.tolist() if aux else None}
    if rows is not None:
        train = shard_refs(rows, cfg.train.num_workers)
        info["steps"] = round_steps(rows, cfg.train.num_workers, cfg.train.batch_size)
    else:
        train, steps = file_shards(es, cfg.train.num_workers, cfg.train.batch_size)
        info["steps"] = steps
    extra.update(real_per_epoch=int(real.sum()), synthetic_per_epoch=int(syn.sum()))
    return train, val, info, extra


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
