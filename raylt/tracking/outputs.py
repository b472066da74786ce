"""A fit's output folder as the record of its run: `config.yaml`, `model_meta.json`, `run.json`.

`config.yaml` is the resolved config, `model_meta.json` what the logged model needs beside its
head (class names, the backbone config it was trained on), and `run.json` which MLflow run the
fit belongs to, whether it is logged, and its model URI once it is. The folder is complete
before anything is logged, so `raylt log OUT` can log a fit whose server was lost (design
brief, house style 9). This module is the one that reads and writes those files.
"""

from __future__ import annotations

import json
from pathlib import Path

from raylt.config import RayltConfig, dump_yaml, load_config
from raylt.errors import DataError, RayltError

CONFIG_FILE, META_FILE, RUN_FILE = "config.yaml", "model_meta.json", "run.json"


def write_record(out: Path, cfg: RayltConfig, run: dict, model_meta: dict) -> None:
    """The three files of a fit that has started: its config, its model's metadata, its run."""
    (out / CONFIG_FILE).write_text(dump_yaml(cfg))
    (out / META_FILE).write_text(json.dumps(model_meta))
    write_run(out, {**run, "logged": False})


def write_run(out: Path, run: dict) -> None:
    (out / RUN_FILE).write_text(json.dumps(run, indent=1) + "\n")


def read_run(out: Path) -> dict:
    """`run.json` of a finished fit; a one-line error when the folder holds none."""
    if not (out / RUN_FILE).is_file() or not (out / "metrics.json").is_file():
        raise RayltError(f"{out} holds no finished fit (run.json and metrics.json); pass the folder a fit wrote")
    return json.loads((out / RUN_FILE).read_text())


def read_config(out: Path) -> RayltConfig:
    return load_config(out / CONFIG_FILE)


def read_model_meta(path: Path) -> dict:
    """The model's metadata: `path` is the file itself (an MLflow artifact) or a fit's folder."""
    path = path / META_FILE if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"{path.parent} has head.npz but no {META_FILE}; pass the output folder of a finished fit")
    return json.loads(path.read_text())
