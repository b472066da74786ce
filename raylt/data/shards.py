"""What the sources made of shards share (WebDataset tars, Parquet files of images): brace
patterns of file names, labels read from the records themselves, and counted skips.
"""

from __future__ import annotations

import itertools
import logging
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from raylt.config import DataConfig, expand_path
from raylt.data.classnames import read_class_names
from raylt.data.source import Source, apply_longtail, make_source, root_and_train
from raylt.errors import ConfigError, DataError
from raylt.ops.storage import resolve
from raylt.longtail import classes_of_labels

log = logging.getLogger(__name__)

_BRACE = re.compile(r"\{([^{}]*)\}")
_READERS = 16  # shards indexed at once: on object storage each is a round trip and a stream


def read_each(fn: Callable, paths: list[str]) -> list:
    """`fn(path)` of every shard, in order, several at a time: indexing is I/O (a stream per
    object on object storage), so threads overlap the waits. The first failure, in shard
    order, is raised as it is."""
    if len(paths) < 2:
        return [fn(p) for p in paths]
    with ThreadPoolExecutor(min(_READERS, len(paths))) as pool:
        return list(pool.map(fn, paths))


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar; `{x,y}` -> x, y (zero padding
    kept from the range's first bound, as WebDataset's own patterns)."""
    parts, pos, choices = [], 0, []
    for m in _BRACE.finditer(pattern):
        parts.append(pattern[pos:m.start()])
        body = m[1]
        rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if rng:
            lo, hi = int(rng[1]), int(rng[2])
            if hi < lo:
                raise ConfigError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards")
            if hi - lo >= 1_000_000:
                raise ConfigError(f"shard pattern {pattern!r}: range {{{body}}} names over a million shards")
            width = len(rng[1])
            choices.append([str(i).zfill(width) for i in range(lo, hi + 1)])
        else:
            choices.append(body.split(","))
        pos = m.end()
    tail = pattern[pos:]
    return ["".join(p + c for p, c in zip(parts, combo)) + tail for combo in itertools.product(*choices)]


@dataclass(frozen=True)
class ShardFiles:
    """`data.root` (a folder or an object-storage URI) and each split's files under it."""

    root: str  # as the file system names it: an absolute path, or `bucket/prefix`
    files: dict[str, list[str]]
    filesystem: object  # pyarrow file system for object storage, None for the local disk

    def name(self, path: str) -> str:
        """`path` relative to the root: ids and messages do not depend on where the data is mounted."""
        return posixpath.relpath(path, self.root)


def shard_files(cfg: DataConfig) -> ShardFiles:
    """The files of each split (`data.splits`: split -> pattern under `data.root`)."""
    filesystem, root = resolve(root_and_train(cfg, "the folder of the shards, or an s3:// / gs:// URI",
                                              "a shard pattern"))
    files = {split: [posixpath.join(root, n) for n in expand_braces(cfg.splits[split])] for split in cfg.splits}
    return ShardFiles(root, files, filesystem)


def records_source(cfg: DataConfig, shards: ShardFiles, rows: dict, skipped: list[str], what: str, fix: str,
                   **refs: Callable) -> Source:
    """The source of records indexed from shards: `rows` holds each kept record's id, label
    value, split, path and `where` (for errors), plus what `refs` turn into `make_source`'s
    reference to the image inside its file (each called with `pick(column)` of the kept rows)."""
    check_skipped(skipped, len(rows["id"]) + len(skipped), cfg, what, fix)
    labels, names = labels_and_names(cfg, rows["value"], rows["where"], rows["split"],
                                     f"the {what} of {cfg.splits['train']}")
    keep = apply_longtail(rows["id"], labels, rows["split"], cfg, len(names))
    pick = lambda col: [rows[col][i] for i in keep]  # noqa: E731
    return make_source(ids=pick("id"), labels=labels[keep], splits=pick("split"), class_names=names,
                       origin=f"{cfg.root.rstrip('/')}/{cfg.splits['train']}", paths=pick("path"),
                       filesystem=shards.filesystem, **{k: ref(pick) for k, ref in refs.items()})


def check_skipped(skipped: list[str], total: int, cfg: DataConfig, what: str, fix: str) -> None:
    """Records left out (each `shard:record (why)`): reported with examples, and a one-line error
    once more than `data.max_bad_fraction` of `total`."""
    if not skipped:
        return
    log.warning("%d of %d %s skipped: %s", len(skipped), total, what, "; ".join(skipped[:3]))
    if len(skipped) > int(cfg.max_bad_fraction * total):
        raise DataError(f"{len(skipped)} of {total} {what} cannot be used, above data.max_bad_fraction="
                        f"{cfg.max_bad_fraction}: {'; '.join(skipped[:3])}; {fix}, or raise data.max_bad_fraction")


def labels_and_names(cfg: DataConfig, values: list, wheres: list[str], splits: list[str],
                     what: str) -> tuple[np.ndarray, list[str]]:
    """Label indices and class names from labels stored in the records: integers are class
    indices (named by `data.class_names`, else by their number), text values are class names
    (`data.class_names` order, else sorted names of the train split). A label outside the
    classes is a one-line error naming its record (`wheres`)."""
    names = read_class_names(expand_path(cfg.class_names)) if cfg.class_names else None
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        labels = np.asarray(values, dtype=np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= (len(names) if names else np.iinfo(np.int64).max)))
        if len(bad):
            of = f"the {len(names)} classes of data.class_names" if names else "the class indices 0..C-1"
            raise DataError(f"{wheres[bad[0]]}: label {labels[bad[0]]} is outside {of}; fix the label or the class list")
        if names is None:
            names = [str(i) for i in range(classes_of_labels(labels, what))]
        return labels, names
    texts = [str(v) for v in values]
    if names is None:
        names = sorted({t for t, s in zip(texts, splits) if s == "train"})
    index = {n: i for i, n in enumerate(names)}
    for t, w in zip(texts, wheres):
        if t not in index:
            raise DataError(f"{w}: label {t!r} is not one of the {len(names)} classes "
                            f"({'data.class_names' if cfg.class_names else 'the train split'}); fix the label or the "
                            "class list")
    return np.asarray([index[t] for t in texts], dtype=np.int64), names
