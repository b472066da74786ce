"""Split files in the Places-LT / ImageNet-LT format: `relative/path.jpg <label>` per line.

Paths are relative to `data.root`; a path that leaves the root (`..`, absolute) is refused
unless `data.allow_outside_root` is set, so a shared split file cannot read arbitrary files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raylt.config import DataConfig, expand_path
from raylt.data.classnames import read_class_names
from raylt.data.lists import parse_list
from raylt.data.source import SOURCES, Source, apply_longtail, make_source, root_and_train
from raylt.errors import DataError
from raylt.longtail import classes_of_labels


def parse_split_file(path: Path, allow_outside_root: bool = False) -> tuple[list[str], np.ndarray]:
    """Relative paths and integer labels of a split file; errors name the file and line."""
    if not path.is_file():
        raise DataError(f"split file {path} does not exist; check data.split_dir and data.splits")
    paths, labels = parse_list(path, True, allow_outside_root, "data.allow_outside_root=true")
    if not paths:
        raise DataError(f"split file {path} lists no images")
    return paths, np.asarray(labels, dtype=np.int64)


def resolve_split(cfg: DataConfig, name: str) -> Path:
    """The file of split `name`: `data.splits[name]`, relative to `data.split_dir` unless absolute."""
    p = Path(cfg.splits[name]).expanduser()
    if not p.is_absolute() and cfg.split_dir is not None:
        p = expand_path(cfg.split_dir) / p
    return p.resolve()


@SOURCES.register("split_file")
def load_split_files(cfg: DataConfig) -> Source:
    root = expand_path(root_and_train(cfg, "the image root folder", "a split file"))
    rel_paths, labels, splits = [], [], []
    files = {}
    for split in cfg.splits:
        files[split] = resolve_split(cfg, split)
        p, lab = parse_split_file(files[split], cfg.allow_outside_root)
        rel_paths += p
        labels.append(lab)
        splits += [split] * len(p)
    labels = np.concatenate(labels)
    if cfg.class_names:
        names_file = Path(cfg.class_names).expanduser()
        if not names_file.is_absolute() and cfg.split_dir is not None:
            names_file = expand_path(cfg.split_dir) / names_file
        names = read_class_names(names_file, rel_paths, labels)
        num_classes = len(names)
        too_big = np.flatnonzero(labels >= num_classes)
        if too_big.size:
            i = int(too_big[0])
            split = splits[i]
            raise DataError(
                f"{files[split]}: label {labels[i]} of {rel_paths[i]!r} is outside 0..{num_classes - 1} "
                f"({num_classes} names in {names_file})"
            )
    else:
        num_classes = classes_of_labels(labels, "split files " + ", ".join(map(str, files.values())))
        names = [str(c) for c in range(num_classes)]
    keep = apply_longtail(rel_paths, labels, splits, cfg, num_classes)
    ids = [f"{splits[i]}/{rel_paths[i]}" for i in keep]
    return make_source(
        ids=ids,
        labels=labels[keep],
        splits=[splits[i] for i in keep],
        class_names=names,
        origin=str(files["train"]),
        paths=[str(root / rel_paths[i]) for i in keep],
    )
