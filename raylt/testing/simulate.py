"""Long-tailed embeddings, generated: a stand-in for real CLIP features in tests and benchmarks
when no pretrained model or data set is at hand. Two structurally different generators
(`GENERATORS`), so that a recipe is never tuned to one simulator:

`clip_like` imitates CLIP image embeddings (unit norm, D = 512 or 768):
- a large component shared by all images (CLIP embeddings of unrelated photos have cosine
  similarity around 0.5), which a head must learn to ignore;
- super-classes: groups of classes whose means share a direction, so that the nearest
  classes are the confusable ones (as with "desert/sand" and "desert_road");
- several modes per class (viewpoints, sub-types), so a class is not one Gaussian;
- anisotropic within-class spread: a shared low-rank factor (lighting, background) plus
  class-specific directions plus isotropic noise.

`heavy_tailed` keeps the unit norm and the shared component but changes the structure:
super-classes of uneven size, 3 to 9 sub-modes per class with uneven weights, and
Student-t spread (3 degrees of freedom), so that a class has outliers far from its modes and
no Gaussian describes it.

Each also has a class-name text view (`generate(..., text=...)`): what CLIP's text tower would
make of the class names, with a modality gap (the text embeddings' own centroid), names of
varying quality (`TextSpec`), and a share of names that point at a sibling class. The two views
differ in structure: `clip_like`'s names see the class centres through a linear map that is not
the identity; `heavy_tailed`'s know the super-class better than the class, through a
saturating map. `TEXT_SETTINGS`: `scenes` (zero-shot top-1 near CLIP's ~65% on Places- and
ImageNet-like sets) and `species` (names that say almost nothing; zero-shot near chance).

The train split follows a given count per class (e.g. the real Places-LT profile); val and
test are balanced. `balanced_twin` draws, from the same class distributions, a balanced
train split of the same total size beside the same test split: the reference a long-tail
recipe is measured against (design brief, section 3). Output columns are the embedding
contract: `embedding`, `label`, `split`, `id`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow.parquet as pq

from raylt.embed.store import embedding_table
from raylt.registry import Registry

# The twin's own random stream: its draws never shift those of the long-tail set.
_TWIN_STREAM = 0x7417


@dataclass(frozen=True)
class LatentSpec:
    dim: int = 512
    classes_per_group: int = 8
    modes: tuple[int, int] = (1, 4)  # modes per class, drawn uniformly from [lo, hi)
    shared: float = 0.8  # norm of the component common to all images (before normalisation)
    group: float = 0.45  # spread of super-class directions
    spread: float = 0.08  # spread of class means within their super-class
    mode: float = 0.08  # spread of modes around the class mean
    noise: float = 1.0  # within-mode noise norm (isotropic + low-rank + class-specific)
    seed: int = 0


@dataclass(frozen=True)
class TextSpec:
    """A class-name text view: what CLIP's text tower would make of each class's name.

    `quality` (lo, hi): how much of a name's text embedding points at its class (drawn per
    class; near 0 the name says almost nothing, as "sp. 4471" would), the rest `noise`;
    `confusable`: the share
    of names that point at a sibling class of the same super-class instead (an ambiguous or
    wrong name); `gap`: the norm of the text side's own centroid, the modality gap (CLIP's
    text and image embeddings sit in two narrow cones apart).
    """

    quality: tuple[float, float] = (0.2, 1.0)
    noise: float = 0.02  # what a name of quality 0 is made of, against a signal of norm 1
    confusable: float = 0.05
    gap: float = 1.0


# Text views, by how informative the names are: `scenes` (and `objects`) name things CLIP's
# captions name, with zero-shot top-1 near the ~65% CLIP reaches on Places/ImageNet-like sets;
# `species` are Latin binomials it barely knows, with zero-shot near chance.
TEXT_SETTINGS: dict[str, TextSpec] = {
    "scenes": TextSpec(),
    "species": TextSpec(quality=(0.0, 0.0), noise=0.1, confusable=0.3),
}


@dataclass(frozen=True)
class SimClass:
    """One generated class: `draw(rng, n) -> [n, D]` unit rows, its centre (before the rows are
    put on the sphere) and its super-class."""

    draw: Callable[[np.random.Generator, int], np.ndarray]
    mean: np.ndarray
    group: int


@dataclass(frozen=True)
class Generator:
    """A generator's classes and its text view.

    `classes(rng, C, spec)`: called with the data set's random stream, yields one `SimClass`
    per class; class k's parameters are drawn when it is reached, after class k-1's rows.
    `text(rng, classes, spec, text_spec) -> [C, D]` unit text embeddings of the class names,
    on a random stream of its own, so that asking for them never changes the images."""

    classes: Callable[[np.random.Generator, int, LatentSpec], Iterator[SimClass]]
    text: Callable[[np.random.Generator, list, LatentSpec, TextSpec], np.ndarray]


GENERATORS: Registry[Generator] = Registry("embedding generator")
_TEXT_STREAM = 0x7E47


def _unit(rng, n, d):
    v = rng.normal(size=(n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _on_sphere(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clip_classes(rng, c: int, spec: LatentSpec):
    d = spec.dim
    common = _unit(rng, 1, d)[0] * spec.shared
    groups = _unit(rng, (c + spec.classes_per_group - 1) // spec.classes_per_group, d) * spec.group
    means = common + groups[np.arange(c) // spec.classes_per_group] + _unit(rng, c, d) * spec.spread
    basis = np.linalg.qr(rng.normal(size=(d, 24)))[0]  # shared nuisance directions
    for k in range(c):
        m = rng.integers(*spec.modes)
        centres = means[k] + _unit(rng, m, d) * spec.mode
        own = np.linalg.qr(rng.normal(size=(d, 8)))[0]  # class-specific directions

        def draw(r, n, m=m, centres=centres, own=own):
            which = r.integers(0, m, n)
            z = (r.normal(size=(n, d)) * (0.5 / np.sqrt(d))
                 + r.normal(size=(n, 24)) @ basis.T * (0.6 / np.sqrt(24))
                 + r.normal(size=(n, 8)) @ own.T * (0.6 / np.sqrt(8))) * spec.noise
            return _on_sphere(centres[which] + z)

        yield SimClass(draw, means[k], k // spec.classes_per_group)


def _heavy_classes(rng, c: int, spec: LatentSpec):
    d, dof = spec.dim, 3.0
    common = _unit(rng, 1, d)[0] * spec.shared
    sizes = rng.integers(2, 2 * spec.classes_per_group + 1, c)  # uneven super-classes, 2 to 16 classes
    group_of = np.repeat(np.arange(c), sizes)[:c]
    groups = _unit(rng, c, d) * spec.group
    means = common + groups[group_of] + _unit(rng, c, d) * spec.spread * 1.2
    basis = np.linalg.qr(rng.normal(size=(d, 32)))[0]
    for k in range(c):
        m = int(rng.integers(3, 10))
        weights = rng.dirichlet(np.ones(m))  # uneven sub-modes: some are rare within the class
        centres = means[k] + _unit(rng, m, d) * spec.mode * 1.5
        own = np.linalg.qr(rng.normal(size=(d, 12)))[0]

        def draw(r, n, m=m, weights=weights, centres=centres, own=own):
            which = r.choice(m, n, p=weights)
            g = (r.normal(size=(n, d)) * (0.45 / np.sqrt(d))
                 + r.normal(size=(n, 32)) @ basis.T * (0.5 / np.sqrt(32))
                 + r.normal(size=(n, 12)) @ own.T * (0.55 / np.sqrt(12)))
            scale = np.sqrt((dof - 2) / r.chisquare(dof, n))[:, None]  # Student-t with unit variance
            return _on_sphere(centres[which] + g * scale * spec.noise)

        yield SimClass(draw, means[k], int(group_of[k]))


def _siblings(rng, groups: np.ndarray, share: float) -> np.ndarray:
    """The class each name points at: its own, or for a `share` of the classes another class of
    the same super-class (when there is one)."""
    c = len(groups)
    target = np.arange(c)
    for k in np.flatnonzero(rng.random(c) < share):
        same = np.flatnonzero((groups == groups[k]) & (np.arange(c) != k))
        if len(same):
            target[k] = rng.choice(same)
    return target


def _name_embeddings(rng, signal: np.ndarray, text: TextSpec) -> np.ndarray:
    """unit(gap g + unit(q_c unit(signal_c) + (1 - q_c) noise n_c)): names of quality q_c (at 0
    pure noise, a name that says nothing) in the text tower's own cone, `text.gap` away along a
    direction g shared by all names."""
    c, d = signal.shape
    q = rng.uniform(*text.quality, c)[:, None]
    said = _on_sphere(q * _on_sphere(signal) + (1 - q) * text.noise * _unit(rng, c, d))
    return _on_sphere(_unit(rng, 1, d)[0] * text.gap + said).astype(np.float32)


def _clip_text(rng, classes: list, spec: LatentSpec, text: TextSpec) -> np.ndarray:
    """The names see what tells a class from the others, not what varies within it: the class
    centres through the inverse within-class covariance (estimated from a few rows per class),
    a linear map far from the identity."""
    d = spec.dim
    mu = np.stack([k.mean for k in classes])
    per = max(2, 12000 // len(classes))
    rows = np.stack([k.draw(rng, per) for k in classes])  # [C, per, D]
    rows = (rows - rows.mean(1, keepdims=True)).reshape(-1, d)
    cov = rows.T @ rows / len(rows)
    cov += 0.02 * np.trace(cov) / d * np.eye(d)
    target = _siblings(rng, np.array([k.group for k in classes]), text.confusable)
    return _name_embeddings(rng, np.linalg.solve(cov, (mu - mu.mean(0)).T).T[target], text)


def _heavy_text(rng, classes: list, spec: LatentSpec, text: TextSpec) -> np.ndarray:
    """The names know a class's super-class better than the class itself (the class's own part
    weighted 0.8-1.2 by class against the super-class's 1), through a saturating map (tanh of
    the coordinates in a random basis): no linear map takes them to the class centres."""
    d = spec.dim
    mu = np.stack([k.mean for k in classes])
    groups = np.array([k.group for k in classes])
    _, inverse = np.unique(groups, return_inverse=True)
    centres = np.stack([mu[inverse == g].mean(0) for g in range(inverse.max() + 1)])[inverse]
    between, within = centres - mu.mean(0), mu - centres
    own = rng.uniform(0.8, 1.2, len(mu))[:, None]
    scale = np.linalg.norm(between, axis=1).mean() / np.maximum(np.linalg.norm(within, axis=1).mean(), 1e-12)
    signal = between + own * within * scale
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    z = signal @ basis
    signal = np.tanh(0.5 * z / z.std()) @ basis.T
    target = _siblings(rng, groups, text.confusable)
    return _name_embeddings(rng, signal[target], text)


GENERATORS.register("clip_like", "shared component, super-classes of 8, 1-3 modes, Gaussian anisotropic spread")(
    Generator(_clip_classes, _clip_text))
GENERATORS.register("heavy_tailed", "uneven super-classes, 3-9 weighted sub-modes, Student-t spread (3 dof)")(
    Generator(_heavy_classes, _heavy_text))


def generate(generator: str, train_counts, eval_per_class: int = 100, spec: LatentSpec = LatentSpec(),
             splits=("test",), twin_counts=None, text: TextSpec | str | None = None):
    """(embeddings [N, D] float32, labels [N] int64, split names [N]) for the given profile, and
    with `twin_counts` also (embeddings, labels) of a train split of those counts drawn from the
    same class distributions (else None). With `text` (a `TextSpec` or a `TEXT_SETTINGS` name)
    a third item: the class names' text embeddings [C, D] (the images are the same either way)."""
    rng = np.random.default_rng(spec.seed)
    twin_rng = np.random.default_rng([spec.seed, _TWIN_STREAM])
    counts = np.asarray(train_counts, dtype=np.int64)
    gen = GENERATORS.get(generator)
    xs, ys, ss, tx, ty, classes = [], [], [], [], [], []
    for k, cls in enumerate(gen.classes(rng, len(counts), spec)):
        classes.append(cls)
        for split, n in [("train", counts[k])] + [(s, eval_per_class) for s in splits]:
            xs.append(cls.draw(rng, n))
            ys.append(np.full(n, k))
            ss.append(np.full(n, split))
        if twin_counts is not None:
            tx.append(cls.draw(twin_rng, int(twin_counts[k])))
            ty.append(np.full(int(twin_counts[k]), k))
    out = np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64), np.concatenate(ss)
    twin = (np.concatenate(tx).astype(np.float32), np.concatenate(ty).astype(np.int64)) if twin_counts is not None else None
    if text is None:
        return out, twin
    text = TEXT_SETTINGS[text] if isinstance(text, str) else text
    return out, twin, gen.text(np.random.default_rng([spec.seed, _TEXT_STREAM]), classes, spec, text)


def clip_like(train_counts, eval_per_class: int = 100, spec: LatentSpec = LatentSpec(), splits=("test",)):
    """(embeddings [N, D] float32, labels [N] int64, split names [N]) for the given profile."""
    return generate("clip_like", train_counts, eval_per_class, spec, splits)[0]


def balanced_counts(total: int, num_classes: int) -> np.ndarray:
    """`total` images over `num_classes` classes as evenly as they go (the first classes take the rest)."""
    out = np.full(num_classes, total // num_classes, np.int64)
    out[: total % num_classes] += 1
    return out


def balanced_twin(generator: str, train_counts, eval_per_class: int = 100, spec: LatentSpec = LatentSpec(),
                  splits=("test",), text: TextSpec | str | None = None):
    """The long-tail set ((x, y, split), as `generate` gives it) and its balanced twin's train
    split (x, y): the same class distributions, the same total number of train images, spread
    evenly over the classes. Evaluate both on the long-tail set's test split. With `text`, the
    class names' text embeddings as a third item."""
    counts = np.asarray(train_counts, dtype=np.int64)
    return generate(generator, counts, eval_per_class, spec, splits, balanced_counts(int(counts.sum()), len(counts)),
                    text)


def with_look_alikes(train_counts, aux_per_class: int, eval_per_class: int = 100, spec: LatentSpec = LatentSpec(),
                     splits=("test",)):
    """A target corpus and an auxiliary one whose class j is a look-alike of target class j
    (drawn from the same super-class): ((x, y, split) target, (x, y, split) auxiliary with
    `aux_per_class` train rows per class and no eval rows). For category extrapolation."""
    counts = np.asarray(train_counts, dtype=np.int64)
    both = np.empty(2 * len(counts), np.int64)
    both[0::2], both[1::2] = counts, aux_per_class  # interleaved: neighbours share a super-class
    x, y, s = clip_like(both, eval_per_class, spec, splits)
    t = (y % 2 == 0)
    a = ~t & (s == "train")
    return (x[t], y[t] // 2, s[t]), (x[a], y[a] // 2, s[a])


# Ranked class sizes of the real Places-LT train split at a few ranks (rank: images).
_PLACES_LT_ANCHORS = {0: 4980, 1: 2612, 2: 2400, 5: 1487, 10: 1023, 20: 521, 50: 287, 100: 152, 130: 103,
                      150: 89, 200: 57, 250: 34, 293: 20, 300: 18, 330: 11, 364: 5}


def places_lt_profile() -> np.ndarray:
    """An approximation of the Places-LT train profile, for when its split file is not at hand:
    log-linear between the real ranked counts above (365 classes, 4,980 down to 5, about
    64,000 images, many/medium/few 134/161/70 against the real 131/163/71)."""
    ranks, sizes = zip(*_PLACES_LT_ANCHORS.items())
    return np.round(np.exp(np.interp(np.arange(365), ranks, np.log(sizes)))).astype(np.int64)


def inat_like_profile(classes: int = 8142, total: int = 437_513, groups=(842, 4076, 3224)) -> np.ndarray:
    """A long tail the size of iNaturalist 2018's train split (8,142 classes, 437,513 images,
    1,000 down to 2) with `groups` many (> 100), medium (20-100) and few (< 20) classes.
    Medium and few classes are log-linear in rank (100 to 20, 19 to 2); the many-shot curve
    from 1,000 to 101 is bent to make the total. `classes` below 8,142 keeps the shape
    and scales the group sizes and total with it."""
    from scipy.optimize import brentq  # scipy (with scikit-learn) only for this profile

    scale = classes / sum(groups)
    many, medium = round(groups[0] * scale), round(groups[1] * scale)
    few = classes - many - medium

    def loglin(hi, lo, n, bend=1.0):
        v = np.linspace(1.0, 0.0, n) ** bend
        return np.round(lo * (hi / lo) ** v)

    tail = np.concatenate([loglin(100, 20, medium), loglin(19, 2, few)])
    budget = total * scale - tail.sum()
    bend = brentq(lambda k: loglin(1000, 101, many, k).sum() - budget, 0.05, 50)
    return np.concatenate([loglin(1000, 101, many, bend), tail]).astype(np.int64)


def write_parquet(x: np.ndarray, y: np.ndarray, split: np.ndarray, path: Path, class_names=None) -> Path:
    """The embedding contract as one Parquet file (plus classnames.txt beside it if given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.array([f"sim/{i}" for i in range(len(y))])
    pq.write_table(embedding_table(x, y, split, ids), path)
    if class_names is not None:
        (path.parent / "classnames.txt").write_text("\n".join(class_names) + "\n")
    return path
