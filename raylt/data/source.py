"""The record table every data source produces, its validation, and the source registry.

Columns: `id` string (unique), `label` int64, `split` string, and either `path` string
(absolute image path) or `image` binary (encoded image bytes, for in-memory data sets). Where
an image is a byte range of a larger file (a member of a tar shard), `offset` and `size`
(int64) give the range of `path`; where it is a cell of a Parquet file, `parquet_row` and
`image_column` name it. The decode tasks read those themselves.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from raylt import longtail
from raylt.choices import SOURCES  # declared there: names, help, this module
from raylt.config import DataConfig
from raylt.errors import ConfigError, DataError


@dataclass(frozen=True)
class Source:
    table: pa.Table
    class_names: tuple[str, ...]
    origin: str  # what the user named (a folder, a split file), for messages
    # pyarrow file system of the `path`s when they are on object storage (raylt.ops.storage), else None
    filesystem: object = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> pa.Table:
        return self.table.filter(pc.equal(self.table["split"], name))

    def splits(self) -> list[str]:
        return sorted(set(self.table["split"].to_pylist()))

    def counts(self, split: str = "train") -> np.ndarray:
        labels = self.split(split)["label"].to_numpy()
        return longtail.class_counts(labels, self.num_classes)

    def fingerprint(self) -> str:
        """Hash of ids, labels, splits and class names: what the embedding store is keyed on."""
        h = hashlib.sha256()
        for col in ("id", "label", "split"):
            for chunk in self.table[col].chunks:
                for buf in chunk.buffers():
                    if buf is not None:
                        h.update(memoryview(buf))
        h.update("\n".join(self.class_names).encode())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        parts = [f"{s}: {self.split(s).num_rows}" for s in self.splits()]
        return f"{self.origin}: {longtail.describe(self.counts())}; " + ", ".join(parts)


def png_bytes(img: np.ndarray) -> bytes:
    """An in-memory image (uint8 [H, W, 3]) as PNG bytes: the `image` column of sources that
    hold their images in memory (CIFAR, the demo)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def make_source(
    ids: list[str] | np.ndarray,
    labels: np.ndarray,
    splits: list[str] | np.ndarray,
    class_names: list[str] | tuple[str, ...],
    origin: str,
    paths: list[str] | None = None,
    images: list[bytes] | None = None,
    ranges: tuple[np.ndarray, np.ndarray] | None = None,
    parquet_rows: tuple[np.ndarray, str] | None = None,
    filesystem=None,
) -> Source:
    """Build and validate a Source: unique ids, labels in range, no class without train images."""
    cols = {
        "id": pa.array(ids, pa.string()),
        "label": pa.array(np.asarray(labels, dtype=np.int64)),
        "split": pa.array(splits, pa.string()),
    }
    if (paths is None) == (images is None):
        raise ValueError("a source has exactly one of `paths` and `images`")
    if paths is not None:
        cols["path"] = pa.array(paths, pa.string())
        if ranges is not None:  # (offsets, sizes): each image is that byte range of its path
            cols["offset"], cols["size"] = (pa.array(np.asarray(r, dtype=np.int64)) for r in ranges)
        if parquet_rows is not None:  # (rows, column): each image is that row's bytes in that column of its path
            rows, column = parquet_rows
            cols["parquet_row"] = pa.array(np.asarray(rows, dtype=np.int64))
            cols["image_column"] = pa.array([column] * len(rows), pa.string())
    else:
        cols["image"] = pa.array(images, pa.binary())
    table = pa.table(cols)
    src = Source(table, tuple(class_names), origin, filesystem)
    validate(src)
    return src


def validate(src: Source) -> None:
    t = src.table
    if t.num_rows == 0:
        raise DataError(f"{src.origin} has no images")
    ids = t["id"]
    if pc.count_distinct(ids).as_py() != t.num_rows:
        dup = pc.value_counts(ids).filter(pc.greater(pc.struct_field(pc.value_counts(ids), "counts"), 1))
        first = dup[0]["values"].as_py()
        raise DataError(f"{src.origin} lists {first!r} more than once; each image may appear once")
    labels = t["label"].to_numpy()
    bad = np.flatnonzero((labels < 0) | (labels >= src.num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{src.origin}: label {labels[i]} of {t['id'][i].as_py()!r} is outside 0..{src.num_classes - 1} "
            f"({src.num_classes} classes); fix the label or the class-names file"
        )
    counts = src.counts("train")
    if counts.sum() == 0:
        raise DataError(f"{src.origin} has no `train` split; name it under data.splits")
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        c = int(empty[0])
        raise DataError(
            f"{src.origin}: class {c} ({src.class_names[c]!r}) has no training image "
            f"({empty.size} such classes); remove it from the class list or add images"
        )


def apply_longtail(
    ids, labels, splits, cfg: DataConfig, num_classes: int
) -> np.ndarray:
    """Row indices to keep: the train split subsampled to the configured long-tail profile."""
    labels = np.asarray(labels)
    is_train = np.asarray(splits) == "train"
    keep = np.ones(len(labels), dtype=bool)
    if cfg.imbalance_ratio is None:
        return np.flatnonzero(keep)
    train_idx = np.flatnonzero(is_train)
    chosen = longtail.longtail_indices(
        labels[train_idx], num_classes, cfg.imbalance_ratio, cfg.seed, cfg.max_per_class
    )
    keep[train_idx] = False
    keep[train_idx[chosen]] = True
    return np.flatnonzero(keep)


def root_and_train(cfg: DataConfig, what_root: str, train_example: str) -> str:
    """`data.root` as given, for sources that need it and a `train` entry in `data.splits`."""
    if cfg.root is None:
        raise ConfigError(f"data.root is required for data.source={cfg.source} ({what_root})")
    if "train" not in cfg.splits:
        raise ConfigError(f"data.splits.train is required for data.source={cfg.source} ({train_example})")
    return cfg.root


def load_source(cfg: DataConfig) -> Source:
    return SOURCES.get(cfg.source)(cfg)
