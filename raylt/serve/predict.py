"""Batch prediction with a trained head (`raylt predict`).

Model: any model raylt.serve.model loads (an MLflow model URI or a fit's output folder).

Input, by kind (`INPUTS`, detected from the path unless named):
- `embeddings`: a Parquet file or folder, or an embedding store: column `embedding`, and
  `id`, `label`, `split` when present (`--split` keeps one split);
- `images`: a folder of images, searched recursively; the id is the path below the folder;
- `list`: a text file of image paths, `relative/path.jpg [label]` per line (split files work),
  relative to `--root` (default: the file's folder).

Ray Data does the work: it reads the embeddings, or decodes and embeds the images with the
model's backbone (the embedding stage's CPU decode tasks and encoder actors, GPU ones when the
cluster has GPUs), and scores the head in batch tasks. The driver streams the rows into one
Parquet or CSV file, in input order: a prediction is a few dozen bytes, so one file stays
small, needs no shared storage, and lines up with the input.

Output columns: `row` (input order), `id`, `split`, and `label`/`class` when the input has them,
then `class_1..k`, `label_1..k`, `prob_1..k` (the k most probable classes), and `error`: why a
row has no prediction (an unreadable image, a non-finite embedding). No row is dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import ray
import torch

from raylt.config import BackboneConfig, RayltConfig
from raylt.data.folder import IMAGE_EXTENSIONS
from raylt.data.lists import parse_list
from raylt.embed.backbones import build_encoder
from raylt.embed.inputs import embedding_dim, embedding_files, file_schema
from raylt.embed.stage import build_dataset, plan_resources
from raylt.embed.store import is_store
from raylt.errors import ConfigError, DataError
from raylt.head.artifact import head_logits
from raylt.ops.console import Progress
from raylt.ops.cluster import cluster_cpus, cluster_gpus, init_ray
from raylt.registry import Registry
from raylt.serve.model import Model

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- scoring (pure)


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N, k], probabilities [N, k]) of the k most probable classes, most probable
    first. torch's softmax and top-k: four times numpy's softmax, partition and sort."""
    p, idx = torch.topk(torch.softmax(torch.from_numpy(np.ascontiguousarray(logits, np.float32)), dim=1), k, dim=1)
    return idx.numpy(), p.numpy()


def _stack(col) -> np.ndarray:
    """An embedding column of a numpy batch (a 2-D tensor, or an object array of lists) as [N, D]."""
    if isinstance(col, np.ndarray) and col.dtype != object:
        return col.astype(np.float32, copy=False).reshape(len(col), -1)
    return np.stack([np.asarray(v, dtype=np.float32) for v in col]) if len(col) else np.zeros((0, 0), np.float32)


def score_batch(batch: dict[str, np.ndarray], head: dict, class_names: tuple[str, ...], k: int) -> pa.Table:
    """Ray Data batch UDF: the k best classes of each row; rows that cannot be scored (not
    `ok`, wrong size, NaN) get nulls and the reason in `error`."""
    n = len(batch["embedding"])
    errors = np.asarray(batch["error"], dtype=object) if "error" in batch else np.full(n, "", object)
    ok = np.asarray(batch["ok"], bool).copy() if "ok" in batch else np.ones(n, bool)
    x = _stack(batch["embedding"]) if n else np.zeros((0, head.dim), np.float32)
    broken = ok & ~np.isfinite(x).all(axis=1)
    errors = np.where(broken, "the embedding holds NaN or infinite values", errors)
    ok &= ~broken
    labels = np.zeros((n, k), np.int64)
    probs = np.zeros((n, k), np.float32)
    if ok.any():
        labels[ok], probs[ok] = top_k(head_logits(head, x[ok]), k)
    names = np.asarray(class_names, dtype=object)
    cols = {c: batch[c] for c in ("id", "split") if c in batch}
    if "label" in batch:
        y = np.asarray(batch["label"], np.int64)
        known = (y >= 0) & (y < len(names))
        cols["label"] = pa.array(y, mask=~known)
        cols["class"] = pa.array(np.where(known, names[np.clip(y, 0, len(names) - 1)], None), pa.string())
    for j in range(k):
        cols[f"class_{j + 1}"] = pa.array(np.where(ok, names[labels[:, j]], None), pa.string())
        cols[f"label_{j + 1}"] = pa.array(labels[:, j], mask=~ok)
        cols[f"prob_{j + 1}"] = pa.array(probs[:, j], mask=~ok)
    cols["error"] = pa.array(np.where(ok, None, errors), pa.string())
    return pa.table(cols)


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Request:
    """What `raylt predict` was asked: the model, the input and the run's settings."""

    model: Model
    path: Path
    cfg: RayltConfig  # embed.* and ray.* settings; backbone.* overrides of the model's backbone
    backbone_overrides: dict
    root: Path | None = None  # list input: the folder its paths are relative to
    split: str | None = None  # embeddings input: keep only this split


@dataclass(frozen=True)
class Prepared:
    dataset: object  # a Ray dataset of rows with `embedding` (and `ok`/`error` from images)
    rows: int | None  # None once a filter makes the count unknown
    columns: tuple[str, ...]  # input columns carried into the output


INPUTS: Registry[Callable[[Request], Prepared]] = Registry("prediction input")


@INPUTS.register("embeddings", "Parquet file or folder, or an embedding store (column embedding)")
def _embeddings(req: Request) -> Prepared:
    files, _ = embedding_files(req.path)
    schemas = [file_schema(f) for f in files]
    dim = embedding_dim(files[0], schemas[0], required=("embedding",))
    if dim != req.model.dim:
        raise DataError(f"embeddings {req.path} have D={dim}, the model takes D={req.model.dim}; "
                        "use embeddings of the backbone the model was trained on")
    carried = tuple(c for c in ("id", "label", "split") if all(c in s.names for s in schemas))
    ds = ray.data.read_parquet([str(f) for f in files], columns=["embedding", *carried])
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if req.split is not None:
        if "split" not in carried:
            raise DataError(f"--split {req.split}: embeddings {req.path} have no `split` column; leave --split out")
        ds = ds.filter(expr=f"split == {req.split!r}")
        rows = None
    return Prepared(ds, rows, carried)


def _image_table(ids: list[str], paths: list[str], labels: list[int] | None) -> pa.Table:
    n = len(ids)
    return pa.table({"row": np.arange(n, dtype=np.int64), "id": pa.array(ids, pa.string()),
                     "label": np.asarray(labels if labels is not None else [-1] * n, np.int64),
                     "split": pa.array([""] * n, pa.string()), "path": pa.array(paths, pa.string())})


@INPUTS.register("images", "a folder of images, searched recursively; ids are paths below it")
def _images(req: Request) -> Prepared:
    root = req.path
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"{root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); pass an image folder, "
                        "a list file or embeddings")
    table = _image_table([str(p.relative_to(root)) for p in files], [str(p) for p in files], None)
    return _encoded(req, table, ("id",))


@INPUTS.register("list", "a text file of image paths, `relative/path.jpg [label]` per line, under --root")
def _list(req: Request) -> Prepared:
    root = (req.root or req.path.parent).expanduser().resolve()
    rels, labels = parse_list(req.path, False, False, "an absolute --root that holds them")
    labels = [-1 if lab is None else lab for lab in labels]
    if not rels:
        raise DataError(f"list file {req.path} names no images; one `relative/path.jpg [label]` per line")
    labelled = any(lab >= 0 for lab in labels)
    table = _image_table(rels, [str(root / r) for r in rels], labels if labelled else None)
    return _encoded(req, table, ("id", "label") if labelled else ("id",))


def _encoded(req: Request, table: pa.Table, carried: tuple[str, ...]) -> Prepared:
    """Images decoded and embedded with the model's backbone, as in the embedding stage."""
    if not req.model.backbone:
        raise DataError(f"model {req.model.uri} was trained on embeddings without a known backbone: predict from "
                        "embeddings (`raylt embed`, then pass the store), or train it with `raylt run`")
    fields = {f.name for f in dataclasses.fields(BackboneConfig)}
    backbone = BackboneConfig(**{k: v for k, v in {**req.model.backbone, **req.backbone_overrides}.items()
                                 if k in fields})
    cfg = dataclasses.replace(req.cfg, backbone=backbone)
    encoder = build_encoder(backbone)  # missing weights fail here, before any Ray work
    if encoder.dim != req.model.dim:
        raise ConfigError(f"backbone {backbone.name} gives D={encoder.dim}, the model takes D={req.model.dim}; "
                          "leave backbone.* as the model was trained")
    plan = plan_resources(cfg.embed, cluster_cpus(), cluster_gpus())
    size = cfg.embed.decode_batch_size
    blocks = [table.slice(s, size) for s in range(0, table.num_rows, size)]
    return Prepared(build_dataset(cfg, blocks, encoder, plan), table.num_rows, carried)


def detect(path: Path) -> str:
    """The input kind of a path: embeddings, an image folder or a list file."""
    if not path.exists():
        raise DataError(f"prediction input {path} does not exist; pass embeddings, an image folder or a list file")
    if path.is_file():
        return "embeddings" if path.suffix == ".parquet" else "list"
    if is_store(path) or next(path.rglob("*.parquet"), None) is not None:
        return "embeddings"
    return "images"


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class PredictResult:
    out: Path
    rows: int
    failed: int  # rows without a prediction (see their `error`)
    labelled: int  # rows whose true label is one of the model's classes
    top1: float | None  # accuracy on the labelled rows
    topk: float | None
    seconds: float


class _Writer:
    """One Parquet or CSV file, written through a temporary name and renamed when complete."""

    def __init__(self, out: Path, fmt: str):
        self.out, self.fmt, self.tmp, self.w = out, fmt, out.with_name(f".{out.name}.{os.getpid()}.tmp"), None

    def write(self, t: pa.Table) -> None:
        if self.w is None:
            if self.fmt == "csv":
                self.w = pcsv.CSVWriter(self.tmp, t.schema)
            else:
                self.w = pq.ParquetWriter(self.tmp, t.schema)
        self.w.write_table(t)

    def close(self) -> None:
        if self.w is not None:
            self.w.close()
            os.replace(self.tmp, self.out)

    def discard(self) -> None:
        if self.w is not None:
            self.w.close()
        self.tmp.unlink(missing_ok=True)


FORMATS = ("parquet", "csv")
INPUT_COLUMNS = ("id", "split", "label", "class")


def output_format(out: Path, fmt: str | None) -> str:
    fmt = fmt or ("csv" if out.suffix.lower() == ".csv" else "parquet")
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {list(FORMATS)}")
    return fmt


def predict(req: Request, kind: str | None, out: Path, k: int = 5, fmt: str | None = None) -> PredictResult:
    """Score every row of the input and write the predictions to `out`."""
    if not 1 <= k <= len(req.model.class_names):
        raise ConfigError(f"--top-k {k} must be between 1 and the model's {len(req.model.class_names)} classes")
    fmt = output_format(out, fmt)
    prepare = INPUTS.get(kind or detect(req.path))
    t0 = time.perf_counter()
    init_ray(req.cfg.ray)
    # The output lines up with the input. A dataset takes a copy of the context when it is
    # made, so this comes before the input's dataset is.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    prepared = prepare(req)
    ds = prepared.dataset.map_batches(score_batch, batch_format="numpy", batch_size=4096,
                                      fn_kwargs={"head": req.model.head, "class_names": req.model.class_names, "k": k})
    # Input columns the output carries (the true class name goes with a label), then predictions.
    carried = {*prepared.columns, *(("class",) if "label" in prepared.columns else ())}
    keep = [c for c in INPUT_COLUMNS if c in carried]
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = _Writer(out, fmt)
    done = failed = labelled = hit1 = hitk = 0
    progress = Progress("predicted", prepared.rows or None, "rows", log)
    try:
        for t in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            t = t.select([*keep, *[c for c in t.column_names if c not in INPUT_COLUMNS]])
            t = pa.table({"row": np.arange(done, done + t.num_rows, dtype=np.int64), **{c: t[c] for c in t.column_names}})
            writer.write(t)
            done += t.num_rows
            failed += t.num_rows - t["error"].null_count
            if "label" in t.column_names:
                y, ok = t["label"].to_numpy(zero_copy_only=False), t["error"].is_null().to_numpy(zero_copy_only=False)
                y = np.nan_to_num(np.asarray(y, np.float64), nan=-1).astype(np.int64)
                mask = ok & (y >= 0)
                top = np.stack([t[f"label_{j + 1}"].to_numpy(zero_copy_only=False) for j in range(k)], axis=1)[mask]
                labelled += int(mask.sum())
                hit1 += int((top[:, 0] == y[mask]).sum())
                hitk += int((top == y[mask, None]).any(axis=1).sum())
            progress.update(done)
        if writer.w is None:  # an empty input still gets its (empty) file
            raise DataError(f"prediction input {req.path} has no rows{f' in split {req.split!r}' if req.split else ''}")
    except BaseException:
        writer.discard()
        raise
    finally:
        progress.close()
    writer.close()
    acc = (hit1 / labelled, hitk / labelled) if labelled else (None, None)
    return PredictResult(out, done, failed, labelled, *acc, time.perf_counter() - t0)
