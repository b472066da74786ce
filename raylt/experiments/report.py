"""Side-by-side comparison of MLflow runs (`raylt report`).

Input: run ids, or an experiment (its latest finished runs). Output: one row per run with
test top-1 overall / many / medium / few, the run's wall time and the config values in which
it differs from the others (params), as a Markdown table (`report.md`) and grouped bars
(`report.png`, the ablation's plot). Runs that had class text carry zero-shot CLIP's scores on
the same split: they are a row of their own (one per distinct value), the floor of the others.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from raylt.errors import RayltError
from raylt.experiments import tables
from raylt.experiments.tables import COLUMNS, accuracy_cells, cell
from raylt.tracking import reason, redact


def fetch(run_ids: list[str], tracking_uri: str, experiment: str | None = None, last: int = 10) -> list:
    """The MLflow runs to compare: those named, else the latest `last` finished runs of
    `experiment` that have test metrics."""
    client = MlflowClient(tracking_uri)
    try:
        if run_ids:
            return [client.get_run(r) for r in run_ids]
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise RayltError(f"no experiment {experiment!r} at {redact(tracking_uri)}; it is the config's `name`")
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=200)
    except RayltError:
        raise
    except Exception as e:
        what = f"run(s) {', '.join(run_ids)}" if run_ids else f"experiment {experiment!r}"
        raise RayltError(f"cannot read {what} from {redact(tracking_uri)} ({reason(e)}); check the ids "
                         "(`mlflow ui`) and --tracking-uri") from None
    runs = [r for r in runs if "test_overall" in r.data.metrics][:last]
    if not runs:
        raise RayltError(f"experiment {experiment!r} has no finished run with test metrics yet")
    return runs[::-1]  # oldest first, as they were run


def rows(runs: list) -> list[dict]:
    """One dict per run: label, run id, metrics, seconds and the params that differ."""
    keys = sorted(set().union(*(r.data.params for r in runs)))
    differ = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    out = []
    for r in runs:
        m, info = r.data.metrics, r.info
        seconds = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
        row = {"label": f"{info.run_name or 'run'} ({info.run_id[:8]})", "run_id": info.run_id, "seconds": seconds,
               "differs": {k: r.data.params.get(k, "-") for k in differ}}
        row.update({k: m.get(f"test_{k}") for k in COLUMNS})
        out.append(row)
    floors: dict[tuple, str] = {}
    for r, row in zip(runs, out):
        zs = tuple(r.data.metrics.get(f"test_zero_shot_{k}") for k in COLUMNS)
        if zs[0] is not None:
            floors.setdefault(zs, row["label"])
    for zs, label in floors.items():
        out.append({"label": f"zero-shot CLIP (data of {label})" if len(floors) > 1 else "zero-shot CLIP",
                    "run_id": None, "seconds": None, "differs": {}, **dict(zip(COLUMNS, zs))})
    return out


def markdown(table: list[dict]) -> str:
    rows = [[r["label"], *accuracy_cells(r), cell(r["seconds"], ".0f"),
             ", ".join(f"{k}={_short(v)}" for k, v in r["differs"].items()) or "-"] for r in table]
    return tables.markdown(["run", *COLUMNS, "time s", "config"], rows)


def _short(value: str) -> str:
    """A param as logged (a string), floats to four significant digits (a sweep's draws)."""
    try:
        return value if float(value) == int(float(value)) or "." not in value else f"{float(value):.4g}"
    except (ValueError, OverflowError):
        return value


def write(table: list[dict], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(table) + "\n")
    tables.grouped_bars({r["label"]: r for r in table}, out / "report.png")
    return out / "report.md", out / "report.png"
