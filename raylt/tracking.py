"""MLflow: the one module that talks to it. Runs are logged from the driver only.

The tracking URI is `tracking.uri`, else MLFLOW_TRACKING_URI, else a SQLite database
`mlflow.db` in the current directory, made absolute (a relative URI would follow the
temporary working directory of `ray job submit`). For a SQLite store the experiment's
artifacts go to `mlartifacts/` beside the database, not to `./mlruns` of whatever directory
the job happens to run in. The experiment is `tracking.experiment`, else the config's `name`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from raylt.config import RayltConfig, to_dict

# Row counts of a fit (metrics.json) that are logged as MLflow metrics too.
_COUNTS = ("real_per_epoch", "synthetic_per_epoch", "selected_per_round", "selection_rounds", "auxiliary_classes",
           "auxiliary_rows", "auxiliary_synonyms_dropped")
# MLflow keeps parameter values up to this many characters.
_PARAM_MAX = 6000


def tracking_uri(cfg: RayltConfig) -> str:
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    elif "://" not in uri:  # a bare folder or file path
        uri = str(Path(uri).expanduser().resolve())
    return uri


def flat_params(cfg: RayltConfig) -> dict[str, str]:
    """The resolved config as dotted MLflow params (`embed.batch_size`)."""
    out: dict[str, str] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = str(v)[:_PARAM_MAX]

    walk(to_dict(cfg), "")
    return out


def _experiment_id(mlflow, name: str, uri: str) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


@contextlib.contextmanager
def start_run(cfg: RayltConfig, run_name: str, parent_run_id: str | None = None) -> Iterator[object | None]:
    """An MLflow run with the resolved config as params (a child of `parent_run_id` if given);
    yields None when tracking is off."""
    if not cfg.tracking.enabled:
        yield None
        return
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    exp_id = _experiment_id(mlflow, cfg.tracking.experiment or cfg.name, uri)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, parent_run_id=parent_run_id) as run:
        params = flat_params(cfg)
        keys = sorted(params)
        for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per call
            mlflow.log_params({k: params[k] for k in keys[i : i + 100]})
        yield run


def log_embed(result) -> None:
    """Metrics, tags and the store manifest of an embedding-stage result."""
    import mlflow

    m = result.manifest
    mlflow.log_metrics({
        "embed_images": float(m["num_rows"]),
        "embed_embedded": float(m["embedded"]),
        "embed_skipped": float(m["skipped"]),
        "embed_computed": float(result.computed_rows),
        "embed_seconds": float(result.seconds),
        "embed_images_per_s": float(result.images_per_s),
    })
    mlflow.set_tags({"raylt.store": str(result.store), "raylt.store_reused": str(result.reused), "raylt.dim": m["dim"]})
    mlflow.log_dict(m, "embedding_store/manifest.json")


def worker_target(run) -> dict | None:
    """Where Ray Train's rank 0 logs per-epoch metrics: this run, through this tracking URI."""
    if run is None:
        return None
    import mlflow

    return {"uri": mlflow.get_tracking_uri(), "run_id": run.info.run_id}


def log_fit(metrics: dict, out: Path, stats_file: Path | None, model_meta: dict) -> str:
    """Final metrics, metrics.json, the per-class plot, the class statistics and the model."""
    import mlflow

    from raylt.pyfunc import log_model

    final = {f"test_{k}": metrics[k] for k in ("overall", "many", "medium", "few") if metrics.get(k) is not None}
    final.update({k: v for k, v in metrics["seconds"].items()})
    final.update({k: v for k, v in metrics.items() if k in _COUNTS})
    mlflow.log_metrics({k: float(v) for k, v in final.items()})
    mlflow.log_artifact(str(out / "metrics.json"))
    mlflow.log_artifact(str(out / "per_class.png"))
    if stats_file is not None:
        mlflow.log_artifact(str(stats_file), artifact_path="class_stats")
    return log_model(out / "head.npz", model_meta, out)
