"""Auxiliary classes (category extrapolation): look-alike classes from a second labelled corpus,
trained with the head as extra outputs and dropped at inference.

Seed: "Learning from Neighbors: Category Extrapolation for Long-Tail Learning" (arXiv
2410.15980). The paper finds neighbour categories with an LLM and crawls their images; offline,
raylt takes them from a second labelled embedding corpus (same backbone, same D):
1. score every (target, auxiliary) class pair, by a registered matcher: `text` (CLIP text
   embeddings of "a photo of a {name}.") or `mean` (class-mean embeddings), as the cosine of
   the vectors after removing their common mean;
2. drop near-synonyms: an auxiliary class scoring >= `synonym` with any target class is that
   class under another name, and training it as a rival would fight the target; of two
   auxiliary classes that are near-synonyms of each other only the better-matching one stays;
3. give each target class its `neighbours` best remaining auxiliary classes, `tail_neighbours`
   for classes with fewer than `tail_below` train images (rare classes gain most from them);
4. train on target + capped auxiliary images with the neighbour-silencing loss: for a sample of
   class c the logits of c's own auxiliary neighbours are masked out of the softmax, and for a
   sample of auxiliary class a the logits of the target classes it neighbours are masked, so
   the head learns what surrounds c without being pushed to separate c from its look-alikes.

Input: target class names, counts and means; the auxiliary corpus's names, means and
embeddings. Output: `AuxiliaryPlan` (the auxiliary classes kept and the neighbour matrix), the
silencing mask [C + A, C + A] and the silenced loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from raylt.choices import MATCHERS  # declared there: names, help, this module
from raylt.embed.backbones import text_embeddings
from raylt.errors import ConfigError
from raylt.latent.stats import class_sums


@dataclass(frozen=True)
class AuxiliaryPlan:
    classes: np.ndarray  # [A] auxiliary-corpus labels kept, in head order (head row C + i)
    names: tuple[str, ...]  # [A] their names
    neighbours: np.ndarray  # [C, A] bool: auxiliary class a is a neighbour of target class c
    dropped_synonyms: int  # auxiliary classes dropped as near-synonyms


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


# A matcher maps classes (names, mean embeddings) to vectors whose cosine is their similarity.
@MATCHERS.register("text")
def match_text(names, means, backbone) -> np.ndarray:
    return text_embeddings(backbone, list(names), purpose="auxiliary.match=text (or use auxiliary.match=mean)")


@MATCHERS.register("mean")
def match_mean(names, means, backbone) -> np.ndarray:
    return means


def plan(sim_ta: np.ndarray, sim_aa: np.ndarray, target_counts: np.ndarray, aux_names, neighbours: int,
         tail_neighbours: int, tail_below: int, synonym: float) -> AuxiliaryPlan:
    """Choose the auxiliary classes and each target class's neighbours from the similarities
    target x auxiliary [C, A0] and auxiliary x auxiliary [A0, A0]."""
    c, a0 = sim_ta.shape
    ok = sim_ta.max(0) < synonym if c else np.ones(a0, bool)  # near-synonyms of a target class
    dropped = int((~ok).sum())
    # Among auxiliary near-synonyms keep the best-matching one: greedy in order of best match.
    order = np.argsort(-sim_ta.max(0)) if c else np.arange(a0)
    kept: list[int] = []
    for j in order:
        if ok[j] and not any(sim_aa[j, i] >= synonym for i in kept):
            kept.append(int(j))
        elif ok[j]:
            dropped += 1
    kept_arr = np.asarray(kept, np.int64)
    want = np.where(np.asarray(target_counts) < tail_below, tail_neighbours, neighbours)
    nb = np.zeros((c, len(kept_arr)), bool)
    if len(kept_arr):
        ranked = np.argsort(-sim_ta[:, kept_arr], axis=1, kind="stable")
        for cls in range(c):
            nb[cls, ranked[cls, : want[cls]]] = True
    used = nb.any(0)  # auxiliary classes nobody chose would only dilute the head
    return AuxiliaryPlan(kept_arr[used], tuple(aux_names[i] for i in kept_arr[used]), nb[:, used], dropped)


def silencing_mask(neighbours: np.ndarray) -> torch.Tensor:
    """[C + A, C + A] bool, row y = the logits masked for a sample of class y: a target class's
    auxiliary neighbours, and an auxiliary class's target classes (symmetric)."""
    c, a = neighbours.shape
    m = torch.zeros(c + a, c + a, dtype=torch.bool)
    nb = torch.as_tensor(neighbours, dtype=torch.bool)
    m[:c, c:] = nb
    m[c:, :c] = nb.T
    return m


def silenced(loss_fn: Callable, mask: torch.Tensor) -> Callable:
    """`loss_fn` with each sample's silenced logits set to -inf (zero probability, zero gradient);
    a sample's own class is never masked, so the loss stays finite."""

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(logits.masked_fill(mask.to(logits.device)[y], float("-inf")), y)

    return loss


def class_means(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    return class_sums(x, y, num_classes) / np.maximum(np.bincount(y, minlength=num_classes), 1)[:, None]


def cap_per_class(y: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Indices of at most `cap` random rows per class, sorted."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    ys = y[order]
    first = np.argsort(ys, kind="stable")  # stable: random order kept within each class
    ranks = np.empty(len(y), np.int64)
    starts = np.searchsorted(ys[first], ys[first])
    ranks[first] = np.arange(len(y)) - starts
    return np.sort(order[ranks < cap])


def auxiliary_rows(cfg, target_names, target_counts, target_means, aux_x, aux_y, aux_names, backbone, seed: int):
    """(plan, embeddings [M, D], head labels [M] in C..C+A-1) of the auxiliary training rows."""
    if aux_x.shape[1] != target_means.shape[1]:
        raise ConfigError(
            f"auxiliary.embeddings have D={aux_x.shape[1]} but the target embeddings D={target_means.shape[1]};"
            " embed both corpora with the same backbone"
        )
    a0 = len(aux_names)
    means = class_means(aux_x, aux_y, a0)
    c = len(target_names)
    v = MATCHERS.get(cfg.match)(list(target_names) + list(aux_names), np.concatenate([target_means, means]), backbone)
    # Centred: CLIP image and prompt embeddings share a large common direction (the mean
    # cosine of unrelated photos is about 0.5), which would make every pair look alike.
    v = v - v.mean(0, keepdims=True)
    vt, va = v[:c], v[c:]
    sim_ta, sim_aa = _cosine(vt, va), _cosine(va, va)
    p = plan(sim_ta, sim_aa, target_counts, aux_names, cfg.neighbours, cfg.tail_neighbours, cfg.tail_below,
             cfg.synonym)
    remap = np.full(a0, -1, np.int64)
    remap[p.classes] = c + np.arange(len(p.classes))
    rows = np.flatnonzero(remap[aux_y] >= 0)
    rows = rows[cap_per_class(aux_y[rows], cfg.per_class, seed)]
    return p, aux_x[rows], remap[aux_y[rows]]
