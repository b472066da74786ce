"""Long-tail utilities: class counts, many/medium/few groups, exponential profiles, subsampling.

Groups follow the convention of Liu et al. (OLTR, CVPR 2019) used by every long-tail
benchmark since: many > 100 training images, medium 20-100, few < 20.
"""

from __future__ import annotations

import numpy as np

from raylt.errors import DataError

MANY_ABOVE = 100
FEW_BELOW = 20
GROUPS = ("many", "medium", "few")


def classes_of_labels(labels: np.ndarray, where: str) -> int:
    """C for labels that are class indices 0..C-1 with no class names to count them: max + 1.
    C sizes every per-class array (counts, means, the head's rows), so a stray label of
    1,000,000,000 would allocate for a billion classes: C may be at most ten times the labels
    in use plus 1,000, else a one-line error naming `where`."""
    labels = np.asarray(labels)
    num = int(labels.max()) + 1 if len(labels) else 0
    used = len(np.unique(labels))
    if num > 10 * used + 1000:
        raise DataError(f"{where} have label {num - 1} but only {used} distinct labels; labels are class indices "
                        "0..C-1: remap them, or give a class names file naming every class")
    return num


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def group_of(counts: np.ndarray) -> np.ndarray:
    """Group name of every class from its number of training images."""
    counts = np.asarray(counts)
    return np.where(counts > MANY_ABOVE, "many", np.where(counts >= FEW_BELOW, "medium", "few"))


def group_sizes(counts: np.ndarray) -> dict[str, int]:
    g = group_of(counts)
    return {name: int((g == name).sum()) for name in GROUPS}


def exponential_profile(n_max: int, num_classes: int, imbalance_ratio: float) -> np.ndarray:
    """n_i = floor(n_max * IR^(-i / (C - 1))), the profile of Cao et al. (LDAM, NeurIPS 2019)."""
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance ratio must be >= 1, got {imbalance_ratio}")
    i = np.arange(num_classes, dtype=np.float64)
    exponent = -i / max(num_classes - 1, 1)
    # The tiny epsilon keeps exact integers (500 * 100^-1 = 5) from flooring to 4 on rounding.
    return np.floor(n_max * imbalance_ratio**exponent + 1e-9).astype(np.int64)


def subsample(labels: np.ndarray, per_class: np.ndarray, seed: int) -> np.ndarray:
    """Sorted indices that keep `per_class[c]` randomly chosen images of each class c."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for c, n in enumerate(per_class):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.permutation(idx)[: int(n)])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def longtail_indices(
    labels: np.ndarray, num_classes: int, imbalance_ratio: float, seed: int, n_max: int | None = None
) -> np.ndarray:
    """Indices of an exponential long-tail subset of a (roughly balanced) labelled set."""
    counts = class_counts(labels, num_classes)
    n_max = int(counts.max()) if n_max is None else n_max
    target = np.minimum(exponential_profile(n_max, num_classes, imbalance_ratio), counts)
    return subsample(labels, target, seed)


def describe(counts: np.ndarray) -> str:
    """One line: classes, images, head/tail sizes and the many/medium/few split."""
    counts = np.asarray(counts)
    g = group_sizes(counts)
    return (
        f"{len(counts)} classes, {int(counts.sum())} images, {int(counts.max())} down to "
        f"{int(counts.min())} per class, many/medium/few {g['many']}/{g['medium']}/{g['few']}"
    )
