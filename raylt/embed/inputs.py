"""Embedding inputs of the latent stages: a finished store, or any Parquet file or folder.

Input columns (design brief section 2): `embedding` (fixed_size_list<float32>[D] or a list
of floats), `label` (integer >= 0), `split` (train / val / test); `id` is optional. Class
names come from the store's manifest, else from an optional text file (one per line, in
label order), else `class_<i>`. Output: `EmbeddingSet`, the validated description every
later stage reads from (files, D, classes, counts per split, and for a store the backbone
config it was embedded with), and arrays or Ray datasets of one split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raylt.config import StoreConfig
from raylt.embed.mirror import pulled_store
from raylt.embed.store import is_store, read_manifest, verified_files
from raylt.errors import DataError
from raylt.longtail import classes_of_labels
from raylt.ops.storage import is_uri

log = logging.getLogger(__name__)
REQUIRED = ("embedding", "label", "split")


@dataclass(frozen=True)
class EmbeddingSet:
    path: Path
    files: tuple[str, ...]
    dim: int
    class_names: tuple[str, ...]
    counts: Mapping[str, np.ndarray]  # split -> [C] images per class
    backbone: dict | None = None  # a store's backbone config (how to embed new images); None for other inputs
    is_store: bool = False  # an embedding store (its class statistics are cached beside it)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_counts(self) -> np.ndarray:
        return self.counts["train"]


def _files(path: Path) -> tuple[list[Path], dict | None]:
    if is_store(path):
        man = read_manifest(path)
        return verified_files(path, man), man
    if path.is_file():
        return [path], None
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        if files:
            return files, None
        raise DataError(f"{path} holds no .parquet files; pass a Parquet file, a folder of them, or an embedding store")
    raise DataError(f"embeddings {path} do not exist; pass a Parquet file, a folder of them, or an embedding store")


def embedding_dim(f: Path, schema: pa.Schema, required: tuple[str, ...] = REQUIRED) -> int:
    """D of the file's `embedding` column, after checking it has the `required` columns."""
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise DataError(f"embeddings file {f} lacks column(s) {missing}; it needs {list(required)}")
    t = schema.field("embedding").type
    numeric = hasattr(t, "value_type") and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type))
    if not numeric:
        raise DataError(f"column 'embedding' of {f} is {t}, not a list of floats")
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        first = pq.read_table(f, columns=["embedding"]).slice(0, 1)["embedding"].to_pylist()
        return len(first[0]) if first else 0
    raise DataError(f"column 'embedding' of {f} is {t}, not a list of floats")


def embedding_files(path) -> tuple[list[Path], dict | None]:
    """The Parquet files of an embeddings input (a store's after checking its checksums) and
    the store's manifest, if it is one."""
    return _files(Path(path).expanduser().resolve())


def file_schema(f: Path) -> pa.Schema:
    try:
        return pq.read_schema(f)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"embeddings file {f} is not a readable Parquet file ({str(e).splitlines()[0][:120]}); "
                        "remove it or write it again") from None


def _check_values(f: Path, dim: int) -> None:
    """Every row of a user's file has `dim` finite floats (a store's rows are checked when
    written and vouched for by its checksums)."""
    col = pq.read_table(f, columns=["embedding"])["embedding"].combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        odd = np.flatnonzero(lengths != dim)
        if odd.size:
            raise DataError(f"embeddings file {f}: row {int(odd[0])} has {lengths[odd[0]]} values where the first has "
                            f"{dim}; every embedding must have the same size")
    x = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim) if dim else np.zeros((0, 0))
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise DataError(f"embeddings file {f}: {bad.size} row(s) hold NaN or infinite values (first: row {int(bad[0])}); "
                        "drop or recompute them")
    zero = np.flatnonzero(~x.any(axis=1))
    if zero.size:  # an image's embedding is never the zero vector: a failed or placeholder row
        raise DataError(f"embeddings file {f}: {zero.size} of {len(x)} row(s) are all zeros (first: row {int(zero[0])}); "
                        "drop or recompute them")
    if len(x) > 1 and not (x != x[0]).any():
        raise DataError(f"embeddings file {f}: all {len(x)} rows are the same vector; these are not embeddings of "
                        "different images: recompute them")


def open_embeddings(path, class_names_file: str | None = None, staging: str | None = None) -> EmbeddingSet:
    """Validate an embeddings input and count its images per split and class. A store on
    object storage (`s3://.../<fingerprint>`) is brought into the local copy under `staging`
    (default: store.staging's) first (raylt.embed.mirror)."""
    if is_uri(str(path)):
        path = pulled_store(str(path), staging or StoreConfig().staging)
    path = Path(path).expanduser().resolve()
    files, manifest = _files(path)
    dims, labels, splits = set(), [], []
    for f in files:
        dim = embedding_dim(f, file_schema(f))
        dims.add(dim)
        if manifest is None:
            _check_values(f, dim)
        t = pq.read_table(f, columns=["label", "split"])
        if not pa.types.is_integer(t.schema.field("label").type):
            raise DataError(f"column 'label' of {f} is {t.schema.field('label').type}, not integers")
        labels.append(t["label"].to_numpy(zero_copy_only=False).astype(np.int64))
        splits.append(t["split"].to_numpy(zero_copy_only=False).astype(str))
    if len(dims) != 1:
        raise DataError(f"embeddings under {path} have mixed sizes {sorted(dims)}; use one model's embeddings")
    y, s = np.concatenate(labels), np.concatenate(splits)
    if len(y) and y.min() < 0:
        raise DataError(f"embeddings under {path} have negative labels (e.g. {int(y.min())}); labels are 0..C-1")
    named = class_names_file or (manifest and manifest.get("class_names"))
    num_labels = int(y.max()) + 1 if named and len(y) else classes_of_labels(y, f"embeddings under {path}")
    names = _class_names(manifest, class_names_file, num_labels, path)
    counts = {sp: np.bincount(y[s == sp], minlength=len(names)) for sp in sorted(set(s))}
    if "train" not in counts:
        raise DataError(f"embeddings under {path} have no 'train' split (splits: {sorted(counts)})")
    backbone = manifest.get("backbone_config") if manifest else None  # stores before it was kept: None
    return EmbeddingSet(path, tuple(map(str, files)), dims.pop(), names, counts, backbone, manifest is not None)


def _class_names(manifest: dict | None, file: str | None, num_labels: int, path: Path) -> tuple[str, ...]:
    if file:
        names = [ln.strip() for ln in Path(file).expanduser().read_text().splitlines() if ln.strip()]
    elif manifest and manifest.get("class_names"):
        names = list(manifest["class_names"])
    else:
        return tuple(f"class_{i}" for i in range(num_labels))
    if num_labels > len(names):
        raise DataError(f"embeddings under {path} have label {num_labels - 1} but only {len(names)} class names")
    return tuple(names)


def eval_split(es: EmbeddingSet) -> str:
    """The split a fit is evaluated on: `test`, else `val`."""
    for split in ("test", "val"):
        if es.counts.get(split) is not None and es.counts[split].sum() > 0:
            return split
    raise DataError(f"embeddings under {es.path} have no 'test' or 'val' rows to evaluate on")


def table_arrays(t: pa.Table, dim: int) -> tuple[np.ndarray, np.ndarray]:
    col = t["embedding"].combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        col = col.cast(pa.list_(pa.float32(), dim))
    x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    return x, t["label"].to_numpy(zero_copy_only=False).astype(np.int64)


def read_split(es: EmbeddingSet, split: str, transform=None) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [N, D] float32, labels [N]) of one split, in file order."""
    xs, ys = [], []
    for f in es.files:
        t = pq.read_table(f, columns=["embedding", "label", "split"])
        x, y = table_arrays(t.filter(pc.equal(t["split"], split)), es.dim)
        xs.append(transform(x) if transform else x)
        ys.append(y)
    if not xs:
        return np.zeros((0, es.dim), np.float32), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def read_rows(files, dim: int, split: str, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [hi - lo, D] float32, labels) of rows lo..hi of one split, counted in file
    order: a train worker's shard. Only the files that hold those rows have their embeddings
    decoded, into one array of the shard's size."""
    sizes = []
    for f in files:  # the split column alone first: which files hold the shard
        m = pc.equal(pq.read_table(f, columns=["split"])["split"], split)
        sizes.append(int(pc.sum(m).as_py() or 0))
    hi = sum(sizes) if hi is None else hi
    x, y = np.empty((max(hi - lo, 0), dim), np.float32), np.empty(max(hi - lo, 0), np.int64)
    start = 0
    for f, n in zip(files, sizes):
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            t = pq.read_table(f, columns=["embedding", "label", "split"])
            fx, fy = table_arrays(t.filter(pc.equal(t["split"], split)).slice(a - start, b - a), dim)
            x[a - lo : b - lo], y[a - lo : b - lo] = fx, fy
            del t, fx, fy
            # Arrow's allocator keeps the pages it decoded: without this, a worker trains
            # holding them (0.8 GB at iNaturalist size).
            pa.default_memory_pool().release_unused()
        start += n
    return x, y
