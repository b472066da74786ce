"""Tracking: MLflow runs (raylt.tracking.runs, the only module that calls MLflow) and the output
folder that records a fit (raylt.tracking.outputs). `from raylt import tracking` gives the
run functions by their names."""

from raylt.tracking.runs import (
    check_reachable,
    flat_params,
    log_embed,
    log_epoch,
    log_fit,
    log_results,
    log_saved,
    reason,
    record_run,
    redact,
    start_run,
    tracking_uri,
    worker_target,
)

__all__ = ["check_reachable", "flat_params", "log_embed", "log_epoch", "log_fit", "log_results", "log_saved",
           "reason", "record_run", "redact", "start_run", "tracking_uri", "worker_target"]
