"""What a command checks before it imports torch or starts Ray, so that a mistake costs a
fraction of a second instead of the seconds those take: every registry name in the config
(raylt.choices), the tracking store, and an output folder that holds another config's
checkpoints. The pipeline checks the same again for callers that come to it directly.
"""

from __future__ import annotations

from pathlib import Path

from raylt import tracking
from raylt.choices import check_names
from raylt.config import RayltConfig, to_dict
from raylt.methods.recipes import METHODS, baseline_config
from raylt.ops.checkpoints import refuse_other_config
from raylt.ops.hashing import json_key

# Where and how a fit runs, not what it learns: left out of the checkpoints' key.
_WHERE = ("output_dir", "cpus_per_worker", "threads_per_worker", "placement_strategy", "max_failures")
_AFTER = ("posthoc", "posthoc_tau", "calibrate", "text_ensemble")  # head settings applied after training (LongTailHead.finish)


def fit_key(cfg: RayltConfig) -> str:
    """What a head checkpoint must agree with to be resumed: everything that shapes training,
    the world size included. `auto` counts as one worker: Ray Train's local mode and a
    one-worker group train alike, and resume each other's checkpoints."""
    keep = {k: to_dict(cfg)[k] for k in ("seed", "stats", "sampler", "selection", "adapter", "auxiliary", "head",
                                         "train")}
    keep["train"] = {k: v for k, v in keep["train"].items() if k not in _WHERE}
    workers = cfg.train.num_workers
    keep["train"]["num_workers"] = 1 if workers == "auto" else max(int(workers), 1)
    keep["head"] = {k: v for k, v in keep["head"].items() if k not in _AFTER}
    # Settings of a method that is off do not shape training: changing them keeps checkpoints.
    for method, on in METHODS.items():
        if not on(cfg):
            del keep[method]
    return json_key(keep)


def check_fit(cfg: RayltConfig, out: Path) -> None:
    """A fit of `cfg` into `out` can start: its names exist, its tracking store is usable, and
    `out` holds no checkpoints of another config (one-line errors)."""
    check_names(cfg)
    tracking.check_reachable(cfg)
    refuse_other_config(out / "train", fit_key(cfg), out)


def check_fits(cfg: RayltConfig, out: Path, baseline: bool = False) -> None:
    """`check_fit` of a command's fit into `out` and, with `baseline`, of its baseline into
    `out/baseline`."""
    check_fit(cfg, out)
    if baseline:
        check_fit(baseline_config(cfg), out / "baseline")
