"""How results are shown: one Markdown table renderer and one grouped-bar plot of the
many / medium / few accuracies, for the command summaries, the ablation, tune and report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raylt.longtail import GROUPS

COLUMNS = ("overall",) + GROUPS


def cell(value, spec: str = ".3f") -> str:
    """A table cell: `-` for a missing value, else the value in `spec`."""
    return "-" if value is None else format(value, spec)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def accuracy_cells(metrics: dict) -> list[str]:
    """Overall, many, medium and few top-1 of a result, three decimals."""
    return [cell(metrics.get(k)) for k in COLUMNS]


def grouped_bars(rows: dict, path: Path) -> None:
    """Grouped bars: overall, many, medium, few per row (label -> metrics)."""
    # on first use: a plot is the last step of a command, and matplotlib is slow to import. A
    # Figure of its own (no pyplot): no global figure state, no GUI backend, and 0.3 s less.
    from matplotlib.figure import Figure

    names = list(rows)
    fig = Figure(figsize=(max(6, 0.9 * len(names)), 4))
    ax = fig.subplots()
    width = 0.8 / len(COLUMNS)
    for i, k in enumerate(COLUMNS):
        vals = [np.nan if rows[n].get(k) is None else rows[n][k] for n in names]
        ax.bar(np.arange(len(names)) + (i - 1.5) * width, vals, width, label=k)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("test top-1")
    ax.set_ylim(0, 1)
    ax.legend(ncol=4, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
