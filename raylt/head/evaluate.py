"""Evaluation (pure core): top-1 overall, many / medium / few and per class, plus the plot.

Input: predicted labels, true labels, and the train count of every class. Output: the
`metrics.json` contract of the design brief (section 2): groups by train count, many > 100,
medium 20-100, few < 20 (raylt.longtail), and a plot of per-class accuracy against train count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raylt.longtail import GROUPS, group_of


def evaluate(pred: np.ndarray, labels: np.ndarray, train_counts: np.ndarray, class_names) -> dict:
    c = len(train_counts)
    hit = np.bincount(labels, weights=(pred == labels), minlength=c)
    seen = np.bincount(labels, minlength=c)
    per_class = np.divide(hit, seen, out=np.full(c, np.nan), where=seen > 0)
    groups = group_of(train_counts)
    out = {"overall": float((pred == labels).mean()) if len(labels) else float("nan")}
    for g in GROUPS:
        mask = (groups == g)[labels]  # accuracy over the test images of the group's classes
        out[g] = float((pred == labels)[mask].mean()) if mask.any() else None
    out.update({
        "num_test": int(len(labels)),
        "group_classes": {g: int(((groups == g) & (seen > 0)).sum()) for g in GROUPS},
        "per_class": [None if np.isnan(a) else float(a) for a in per_class],
        "train_counts": [int(n) for n in train_counts],
        "test_counts": [int(n) for n in seen],
        "class_names": list(class_names),
    })
    return out


def write_metrics(metrics: dict, path: Path) -> None:
    path.write_text(json.dumps(metrics, indent=1))


def read_metrics(path: Path) -> dict:
    return json.loads(path.read_text())


def plot_per_class(metrics: dict, path: Path, title: str = "") -> None:
    """Per-class accuracy against train count (log x), one colour per group."""
    # on first use: a plot is the last step of a command, and matplotlib is slow to import. A
    # Figure of its own (no pyplot): no global figure state, no GUI backend, and 0.3 s less.
    from matplotlib.figure import Figure

    n = np.array(metrics["train_counts"], dtype=float)
    acc = np.array([np.nan if a is None else a for a in metrics["per_class"]])
    groups = group_of(n)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for g, colour in zip(GROUPS, ("tab:blue", "tab:orange", "tab:red")):
        m = (groups == g) & ~np.isnan(acc)
        val = metrics.get(g)
        label = f"{g}: {val:.3f}" if val is not None else g
        ax.scatter(np.maximum(n[m], 1), acc[m], s=12, alpha=0.7, color=colour, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class")
    ax.set_ylabel("test top-1 accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or f"overall {metrics['overall']:.3f}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
