"""CIFAR-100 in its standard python-pickle format, made long-tailed as CIFAR-100-LT.

`data.root` is the folder holding `cifar-100-python/` (or that folder itself). The train
split is subsampled with the exponential profile n_i = floor(500 * IR^(-i/99)) and a fixed
seed (10,847 images at IR 100); the test split stays balanced (100 per class). The files
are pickles: only read ones you trust (they come from the path the user named).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from raylt.config import DataConfig, expand_path
from raylt.data.source import SOURCES, Source, apply_longtail, make_source, png_bytes
from raylt.errors import ConfigError, DataError


def cifar_dir(root: Path) -> Path:
    for cand in (root, root / "cifar-100-python"):
        if (cand / "train").is_file() and (cand / "meta").is_file():
            return cand
    raise DataError(
        f"no CIFAR-100 python files under {root} (expected cifar-100-python/train, test, meta); "
        "download cifar-100-python.tar.gz from the CIFAR site and extract it there"
    )


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # any unpickling failure means the file is not CIFAR
        raise DataError(f"{path} is not a CIFAR-100 pickle ({type(e).__name__}: {e})") from None


def read_cifar_split(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 images [N, 32, 32, 3], fine labels [N], file names [N]."""
    d = _unpickle(path)
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(d[b"fine_labels"], dtype=np.int64)
        names = [n.decode() for n in d[b"filenames"]]
    except (KeyError, ValueError) as e:
        raise DataError(f"{path} lacks the CIFAR-100 fields data/fine_labels/filenames ({e})") from None
    return data, labels, names


@SOURCES.register("cifar100")
def load_cifar100(cfg: DataConfig) -> Source:
    if cfg.root is None:
        raise ConfigError("data.root is required for data.source=cifar100 (folder with cifar-100-python/)")
    d = cifar_dir(expand_path(cfg.root))
    meta = _unpickle(d / "meta")
    class_names = [n.decode() for n in meta[b"fine_label_names"]]
    imgs, labels, ids, splits = [], [], [], []
    for split, fname in (("train", "train"), ("test", "test")):
        x, y, names = read_cifar_split(d / fname)
        imgs.append(x)
        labels.append(y)
        ids += [f"{split}/{n}" for n in names]
        splits += [split] * len(y)
    images = np.concatenate(imgs)
    labels = np.concatenate(labels)
    keep = apply_longtail(ids, labels, splits, cfg, len(class_names))
    return make_source(
        ids=[ids[i] for i in keep],
        labels=labels[keep],
        splits=[splits[i] for i in keep],
        class_names=class_names,
        origin=str(d),
        images=[png_bytes(images[i]) for i in keep],
    )
