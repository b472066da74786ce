"""Class-per-folder trees (torchvision ImageFolder layout): `<root>/<split>/<class>/<image>`.

`data.splits` maps split names to sub-folders of the root; left empty, the sub-folders
`train`, `val` and `test` that exist are used, or the root itself is the train split.
Classes are the train split's folder names in sorted order, as ImageFolder numbers them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from raylt.config import DataConfig, expand_path
from raylt.data.source import SOURCES, Source, apply_longtail, make_source
from raylt.errors import ConfigError, DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def default_splits(root: Path) -> dict[str, str]:
    found = {s: s for s in ("train", "val", "test") if (root / s).is_dir()}
    return found or {"train": "."}


def scan_split(split_root: Path) -> dict[str, list[Path]]:
    """Class folder name -> sorted image files below it (recursively)."""
    if not split_root.is_dir():
        raise DataError(f"image folder {split_root} does not exist; check data.root and data.splits")
    classes = {}
    for entry in sorted(os.scandir(split_root), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            files = []
            for dirpath, dirnames, filenames in os.walk(entry.path):
                dirnames.sort()
                files += [Path(dirpath) / f for f in sorted(filenames) if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
            classes[entry.name] = files
    return classes


@SOURCES.register("folder")
def load_folder(cfg: DataConfig) -> Source:
    if cfg.root is None:
        raise ConfigError("data.root is required for data.source=folder (the image tree)")
    root = expand_path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a folder")
    splits_map = dict(cfg.splits) or default_splits(root)
    if "train" not in splits_map:
        raise ConfigError("data.splits must name a `train` sub-folder for data.source=folder")
    scanned = {s: scan_split(root / sub) for s, sub in splits_map.items()}
    names = sorted(scanned["train"])
    if not names:
        raise DataError(f"{root / splits_map['train']} has no class folders")
    index = {n: i for i, n in enumerate(names)}
    paths, labels, splits = [], [], []
    for split, classes in scanned.items():
        for cname, files in classes.items():
            if cname not in index:
                raise DataError(
                    f"{root / splits_map[split] / cname}: class {cname!r} of split {split!r} has no train folder"
                )
            paths += [str(f) for f in files]
            labels += [index[cname]] * len(files)
            splits += [split] * len(files)
    labels = np.asarray(labels, dtype=np.int64)
    keep = apply_longtail(paths, labels, splits, cfg, len(names))
    return make_source(
        ids=[os.path.relpath(paths[i], root) for i in keep],  # unique: the split folder is in it
        labels=labels[keep],
        splits=[splits[i] for i in keep],
        class_names=names,
        origin=str(root),
        paths=[paths[i] for i in keep],
    )
