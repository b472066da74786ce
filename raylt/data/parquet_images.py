"""Parquet files of encoded images, as data-set exporters write them (Hugging Face `datasets`,
Spark, pandas): an image-bytes column, a label column, and optional id and split columns.

`data.splits` maps each split to a file pattern under `data.root` (brace ranges and lists, as
for WebDataset shards); with `data.split_column` set, each row's split comes from that column
instead, whichever pattern named its file. `data.image_column` holds the encoded bytes, either
as binary or as a struct with a `bytes` field (the `datasets` Image feature); `data.label_column`
an integer class index or a class name (named and ordered as for WebDataset labels);
`data.id_column` a unique id (default: the file and the row number).

Only the label, id and split columns are read here. A row is its file and row number
(`path`, `parquet_row`), and each decode task reads the image column of the row groups its
rows fall in, so the driver never holds the images. A row without a label is a counted skip
held to `data.max_bad_fraction`; a row without image bytes is a counted skip when embedded,
like an unreadable image; a missing column or a column of the wrong type is a one-line error
naming the file and the column.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylt.config import DataConfig
from raylt.data.shards import read_each, records_source, shard_files
from raylt.data.source import SOURCES, Source
from raylt.errors import DataError
from raylt.ops.storage import open_input


def _image_type_ok(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return any(t.field(i).name == "bytes" and pa.types.is_binary(t.field(i).type) for i in range(t.num_fields))
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _open(path: str, cfg: DataConfig, filesystem=None) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(open_input(path, filesystem))
    except FileNotFoundError:
        raise DataError(f"Parquet file {path} does not exist; check data.root and data.splits") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"Parquet file {path} cannot be read ({str(e).splitlines()[0][:160]}); copy it again") from None
    schema = pf.schema_arrow
    wanted = {"data.image_column": cfg.image_column, "data.label_column": cfg.label_column,
              "data.id_column": cfg.id_column, "data.split_column": cfg.split_column}
    for key, col in wanted.items():
        if col is not None and col not in schema.names:
            raise DataError(f"Parquet file {path} has no column {col!r} ({key}); its columns: "
                            f"{', '.join(schema.names[:12])}")
    if not _image_type_ok(schema.field(cfg.image_column).type):
        raise DataError(f"Parquet file {path}: column {cfg.image_column!r} (data.image_column) is "
                        f"{schema.field(cfg.image_column).type}, not image bytes (binary, or a struct with `bytes`)")
    return pf


@SOURCES.register("parquet_images")
def load_parquet_images(cfg: DataConfig) -> Source:
    shards = shard_files(cfg)
    cols = {k: [] for k in ("id", "value", "split", "path", "row", "where")}
    skipped: list[str] = []
    files = shards.files
    if cfg.split_column:  # each file once, whichever split's pattern names it: its rows carry their split
        files = {"": list(dict.fromkeys(p for paths in files.values() for p in paths))}
    read = [c for c in dict.fromkeys([cfg.label_column, cfg.id_column, cfg.split_column]) if c]
    for split, paths in files.items():
        for path, t in zip(paths, read_each(lambda p: _open(p, cfg, shards.filesystem).read(columns=read), paths)):
            labels = t[cfg.label_column].to_pylist()
            rel = shards.name(path)
            ids = t[cfg.id_column].to_pylist() if cfg.id_column else [f"{rel}/{i}" for i in range(t.num_rows)]
            row_splits = t[cfg.split_column].to_pylist() if cfg.split_column else itertools.repeat(split)
            for i, (label, rid, sp) in enumerate(zip(labels, ids, row_splits)):
                if label is None or rid is None or sp is None:
                    what = "label" if label is None else "id" if rid is None else "split"
                    skipped.append(f"{rel}:row {i} (no {what})")
                    continue
                cols["id"].append(str(rid))
                cols["value"].append(label)
                cols["split"].append(str(sp))
                cols["path"].append(str(path))
                cols["row"].append(i)
                cols["where"].append(f"Parquet file {path} row {i}")
    return records_source(cfg, shards, cols, skipped, "Parquet rows", "fill or drop those rows",
                          parquet_rows=lambda pick: (np.asarray(pick("row"), np.int64), cfg.image_column))
