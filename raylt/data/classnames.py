"""Class-name files: one class per line, in label order.

Two layouts are read: plain names (`great white shark`), and `KEY NAME...` lines as shipped
with Places-LT (`airfield airfield`) and ImageNet-LT (`n01440764 tench`). A file is keyed
when every line has two or more words and the image folder of every label is one of the
keys. Keyed names are matched to labels through the folders, not the line order: the
Places-LT class list is sorted differently from its labels (`desert-sand` and `desert_road`
swap places), and line order would silently mislabel those classes.
"""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path

import numpy as np

from raylt.errors import DataError

log = logging.getLogger(__name__)


def read_class_names(path: Path, rel_paths: list[str] | None = None, labels: np.ndarray | None = None) -> list[str]:
    if not path.is_file():
        raise DataError(f"class-names file {path} does not exist; fix data.class_names")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise DataError(f"class-names file {path} is empty")
    if rel_paths is None or not all(len(ln.split()) >= 2 for ln in lines):
        return lines
    by_key = {}
    for ln in lines:
        key, name = ln.split(None, 1)
        by_key[key] = name
    folder = _label_folders(rel_paths, labels)
    if len(by_key) != len(lines) or not all(f in by_key for f in folder.values()):
        return lines  # not a keyed file: names with spaces
    names = [ln.split(None, 1)[1] for ln in lines]
    moved = 0
    for c, f in folder.items():
        if c < len(names) and names[c] != by_key[f]:
            names[c] = by_key[f]
            moved += 1
    if moved:
        log.warning("%s: %d class names are out of label order; matched them to labels by folder", path, moved)
    return names


def _label_folders(rel_paths: list[str], labels: np.ndarray) -> dict[int, str]:
    """Label -> the folder holding its first image (`train/n01440764/x.JPEG` -> `n01440764`)."""
    out: dict[int, str] = {}
    for p, lab in zip(rel_paths, labels):
        if int(lab) not in out:
            out[int(lab)] = posixpath.basename(posixpath.dirname(p))
    return out
