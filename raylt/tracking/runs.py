"""MLflow: the one module that talks to it. Runs are logged from the driver only.

The tracking URI is `tracking.uri`, else MLFLOW_TRACKING_URI, else a SQLite database
`mlflow.db` in the current directory, made absolute (a relative URI would follow the
temporary working directory of `ray job submit`). For a SQLite store the experiment's
artifacts go to `mlartifacts/` beside the database, not to `./mlruns` of whatever directory
the job happens to run in. The experiment is `tracking.experiment`, else the config's `name`.

Tracking never costs a run its result. An unreachable server is an error before any work
(`check_reachable`); a server lost mid-run is a warning: training finishes, everything stays
in the output folder (`run.json` says which run it belongs to) and `raylt log OUT` logs it once
the server is back. Secrets never reach MLflow: passwords in URIs and values of environment
variables named like secrets are masked in params (`flat_params`).

MLflow itself is imported by the functions that call it: Ray Train workers import this module
for `log_epoch`, and runs with `tracking.enabled=false` never pay for MLflow's import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import requests

from raylt.config import RayltConfig, to_dict
from raylt.embed.class_text import CLASS_TEXT_FILE
from raylt.errors import ConfigError, RayltError
from raylt.head.evaluate import read_metrics
from raylt.tracking import outputs

log = logging.getLogger(__name__)

# Row counts of a fit (metrics.json) that are logged as MLflow metrics too.
_COUNTS = ("real_per_epoch", "synthetic_per_epoch", "selected_per_round", "selection_rounds", "auxiliary_classes",
           "auxiliary_rows", "auxiliary_synonyms_dropped")
# MLflow keeps parameter values up to this many characters.
_PARAM_MAX = 6000
# MLflow's own defaults (7 retries, backoff factor 2, 120 s timeout) stall a run for minutes
# per call once the server is gone; these apply unless the user set them.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE", re.I)


def tracking_uri(cfg: RayltConfig) -> str:
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    elif "://" not in uri:  # a bare folder or file path
        uri = str(Path(uri).expanduser().resolve())
    return uri


def redact(text: str) -> str:
    """`text` without URI passwords and without the values of secret-named environment
    variables (a `${MLFLOW_TRACKING_PASSWORD}` in a config is expanded before it gets here)."""
    def no_password(m: re.Match) -> str:
        parts = urlsplit(m.group(0))
        if parts.password is None:
            return m.group(0)
        return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}"
                                         + (f":{parts.port}" if parts.port else "")))

    text = re.sub(r"[a-z][a-z0-9+.-]*://[^\s'\"]+", no_password, text)
    # Keys first, values one by one: MLflow's telemetry thread removes a variable of its own
    # while the run starts, and iterating os.environ.items() then raises a KeyError.
    for name in list(os.environ):
        value = os.environ.get(name) or ""
        if _SECRET_NAME.search(name) and len(value) >= 6 and value in text:
            text = text.replace(value, "***")
    return text


def flat_params(cfg: RayltConfig) -> dict[str, str]:
    """The resolved config as dotted MLflow params (`embed.batch_size`), secrets masked."""
    out: dict[str, str] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = redact(str(v))[:_PARAM_MAX]

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


def check_reachable(cfg: RayltConfig) -> None:
    """A one-line error, before any expensive stage, when the tracking store cannot be used."""
    if not cfg.tracking.enabled:
        return
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=10)
        except requests.RequestException as e:
            raise RayltError(
                f"MLflow tracking server {redact(uri)} is unreachable ({type(e).__name__}); start it, fix tracking.uri "
                "(or MLFLOW_TRACKING_URI), or set tracking.enabled=false"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        try:  # SQLite creates the file, not its folder
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create {folder} for MLflow database {uri} ({e.strerror}); fix tracking.uri") from None


def reason(e: Exception) -> str:
    """`Type: first line of the message`, secrets masked: for one-line messages."""
    lines = redact(str(e)).splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def _lost(what: str, e: Exception, out: Path | None = None) -> None:
    later = f"; the results are in {out}: `raylt log {out}` logs them once it is back" if out else ""
    log.warning("MLflow failed while %s (%s)%s", what, reason(e), later)


@contextlib.contextmanager
def start_run(cfg: RayltConfig, run_name: str, parent_run_id: str | None = None,
              run_id: str | None = None) -> Iterator[object | None]:
    """An MLflow run with the resolved config as params (a child of `parent_run_id` if given,
    or the existing run `run_id` continued); yields None when tracking is off. Closing the run
    on a lost server is a warning, not an error: the work is done by then."""
    if not cfg.tracking.enabled:
        yield None
        return
    import mlflow  # on first use (module docstring)

    for k, v in _HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    try:
        if run_id is not None:
            run = mlflow.start_run(run_id=run_id)
        else:
            exp_id = _experiment_id(mlflow, cfg.tracking.experiment or cfg.name, uri)
            run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, parent_run_id=parent_run_id)
            params = flat_params(cfg)
            keys = sorted(params)
            for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per call
                mlflow.log_params({k: params[k] for k in keys[i : i + 100]})
    except RayltError:
        raise
    except Exception as e:
        log.debug("starting the MLflow run failed", exc_info=True)  # the whole story with -v
        with contextlib.suppress(Exception):
            mlflow.end_run("FAILED")
        raise RayltError(f"cannot start an MLflow run at {redact(uri)} ({reason(e)}); fix tracking.uri or set "
                         "tracking.enabled=false") from None
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            mlflow.end_run(status)
        except Exception as e:  # end_run has dropped the run locally before it failed
            _lost("closing the run", e)


def log_embed(result) -> None:
    """Metrics, tags and the store manifest of an embedding-stage result (a warning if the
    server is lost: the store is complete either way)."""
    import mlflow  # on first use (module docstring)

    m = result.manifest
    try:
        mlflow.log_metrics({
            "embed_images": float(m["num_rows"]),
            "embed_embedded": float(m["embedded"]),
            "embed_skipped": float(m["skipped"]),
            "embed_computed": float(result.computed_rows),
            "embed_encoded": float(result.encoded_rows),  # the rest of embed_computed: the image cache
            "embed_seconds": float(result.seconds),
            "embed_images_per_s": float(result.images_per_s),
        })
        mlflow.set_tags({"raylt.store": str(result.store), "raylt.store_reused": str(result.reused),
                         "raylt.dim": m["dim"]})
        mlflow.log_dict(m, "embedding_store/manifest.json")
    except Exception as e:
        _lost("logging the embedding stage", e)


def worker_target(run) -> dict | None:
    """Where Ray Train's rank 0 logs per-epoch metrics: this run, through this tracking URI,
    with the driver's HTTP retry settings (workers do not inherit its environment)."""
    if run is None:
        return None
    import mlflow  # on first use (module docstring)

    return {"uri": mlflow.get_tracking_uri(), "run_id": run.info.run_id,
            "env": {k: os.environ[k] for k in _HTTP_DEFAULTS if k in os.environ}}


def log_epoch(target: dict | None, metrics: dict, epoch: int) -> dict | None:
    """Log one epoch's metrics from a train worker; returns the target, or None once the
    server is lost (the epoch metrics are then dropped with one warning; training goes on)."""
    if not target:
        return None
    from mlflow.entities import Metric  # on first use (module docstring)
    from mlflow.tracking import MlflowClient  # on first use (module docstring)

    for k, v in target.get("env", {}).items():
        os.environ.setdefault(k, v)
    now = int(time.time() * 1000)
    try:
        MlflowClient(target["uri"]).log_batch(
            target["run_id"], metrics=[Metric(k, float(v), now, int(epoch)) for k, v in metrics.items() if k != "epoch"])
    except Exception as e:
        _lost(f"logging epoch {epoch}; later epochs are not logged", e)
        return None
    return target


def log_results(metrics: dict, files: list[Path]) -> bool:
    """Metrics and files into the active run; False (with a warning) when the server is lost."""
    import mlflow  # on first use (module docstring)

    try:
        mlflow.log_metrics(metrics)
        for f in files:
            mlflow.log_artifact(str(f))
    except Exception as e:
        _lost("logging the results", e, files[0].parent if files else None)
        return False
    return True


def record_run(cfg: RayltConfig, out: Path, run, run_name: str, stats_file: Path | None, model_meta: dict) -> None:
    """The output folder's record of this fit (raylt.tracking.outputs): what `raylt log` needs
    to log it later."""
    outputs.write_record(out, cfg, {
        "run_id": run.info.run_id if run is not None else None,
        "tracking_uri": tracking_uri(cfg) if cfg.tracking.enabled else None, "run_name": run_name,
        "stats_file": str(stats_file) if stats_file else None, "registered_model": cfg.tracking.registered_model,
    }, model_meta)


def log_fit(metrics: dict, out: Path) -> str | None:
    """Final metrics, metrics.json, the per-class plot, the class statistics and the model into
    the active run, the model registered when the config names it; the model URI (its
    `models:/<name>/<version>` when registered), or None when the server is lost (the message says how to
    log them later)."""
    import mlflow  # on first use (module docstring)

    # On first use: the logged model's module imports this package (an import cycle).
    from raylt.serve.pyfunc import log_model

    rec = outputs.read_run(out)
    final = {f"test_{k}": metrics[k] for k in ("overall", "many", "medium", "few") if metrics.get(k) is not None}
    final.update({k: v for k, v in metrics["seconds"].items()})
    final.update({k: v for k, v in metrics.items() if k in _COUNTS})
    final.update({f"test_{k}": metrics[k] for k in ("ece",) if metrics.get(k) is not None})
    final.update({f"test_zero_shot_{k}": v for k, v in metrics.get("zero_shot", {}).items() if v is not None})
    final.update({k: metrics[k] for k in ("posthoc_tau", "temperature", "text_ensemble_weight", "text_prior_strength",
                                          "val_balanced_zero_shot", "holdout_rows", "holdout_balanced",
                                          "holdout_balanced_zero_shot") if metrics.get(k) is not None})
    try:
        mlflow.log_metrics({k: float(v) for k, v in final.items()})
        mlflow.log_artifact(str(out / "metrics.json"))
        mlflow.log_artifact(str(out / "per_class.png"))
        if rec["stats_file"] and Path(rec["stats_file"]).is_file():
            mlflow.log_artifact(rec["stats_file"], artifact_path="class_stats")
        if (out / CLASS_TEXT_FILE).is_file():
            mlflow.log_artifact(str(out / CLASS_TEXT_FILE))
        uri = log_model(out / "head.npz", out / outputs.META_FILE)
        if rec.get("registered_model"):
            # MLflow prints its own "Created version" lines; raylt's summary names the version.
            with contextlib.redirect_stderr(io.StringIO()):
                version = mlflow.register_model(uri, rec["registered_model"]).version
            uri = f"models:/{rec['registered_model']}/{version}"
    except Exception as e:
        _lost("logging the results", e, out)
        return None
    outputs.write_run(out, {**rec, "run_id": mlflow.active_run().info.run_id, "logged": True, "model_uri": uri})
    return uri


def log_saved(out: Path, uri: str | None = None) -> tuple[str, str]:
    """Log a finished fit from its output folder (`raylt log`): into its own run when the
    server knows it, else into a new run; (run id, model URI)."""
    import mlflow  # on first use (module docstring)

    out = Path(out).expanduser().resolve()
    rec = outputs.read_run(out)
    cfg = outputs.read_config(out)
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(
        cfg.tracking, enabled=True, uri=uri or rec["tracking_uri"] or tracking_uri(cfg)))
    check_reachable(cfg)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    run_id = rec["run_id"]
    try:
        run_id = run_id if run_id and mlflow.get_run(run_id) else None
    except Exception:  # another server, or the run was deleted: a new run
        run_id = None
    with start_run(cfg, rec["run_name"], run_id=run_id) as run:
        model_uri = log_fit(read_metrics(out / "metrics.json"), out)
    if model_uri is None:
        raise RayltError(f"MLflow at {redact(tracking_uri(cfg))} failed while logging {out}; try again")
    return run.info.run_id, model_uri
