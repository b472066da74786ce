"""Parquet files of encoded images (raylt.data.parquet_images): columns as exporters write
them, bad records, and a run through real Ray Data reading the cells on the decode tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import COLORS, counted_skip, write_image

from raylt.config import load_config
from raylt.data import load_source
from raylt.embed.images import DecodeSpec, decode_batch, decode_image
from raylt.errors import DataError

NAMES = ["red", "green", "blue", "yellow"]


def image_bytes(tmp: Path, c: int, i: int) -> bytes:
    return write_image(tmp / ".img" / f"{c}_{i}.png", COLORS[c], size=(40, 30)).read_bytes()


def write_files(root: Path, split: str, counts, per_file=6, hf=False, text=False, extra=None, group=4) -> list[Path]:
    """<root>/<split>-NNNNN.parquet with `image` (binary, or the `datasets` struct), `label` and
    `img_id` columns; row groups of `group` rows."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [(c, i) for c, n in enumerate(counts) for i in range(n)]
    out = []
    for k in range(0, len(rows), per_file):
        chunk = rows[k:k + per_file]
        data = [image_bytes(root, c, i) for c, i in chunk]
        image = (pa.array([{"bytes": b, "path": f"{c}_{i}.png"} for b, (c, i) in zip(data, chunk)])
                 if hf else pa.array(data, pa.binary()))
        cols = {"image": image, "label": pa.array([NAMES[c] if text else c for c, _ in chunk]),
                "img_id": pa.array([f"{split}/{c}_{i}" for c, i in chunk])}
        cols.update((extra or {}).get(k // per_file, {}))
        path = root / f"{split}-{k // per_file:05d}.parquet"
        pq.write_table(pa.table(cols), path, row_group_size=group)
        out.append(path)
    return out


def cfg_of(root: Path, *extra: str, train="train-{00000..00002}.parquet", test="test-00000.parquet"):
    return load_config(None, ["data.source=parquet_images", f"data.root={root}", f"data.splits.train={train}",
                              f"data.splits.test={test}", *extra])


def decoded(src, spec=DecodeSpec(size=8)):
    cols = ("path", "parquet_row", "image_column", "id", "label", "split")
    batch = {c: src.table[c].to_numpy(zero_copy_only=False) for c in cols}
    batch["row"] = np.arange(src.table.num_rows)
    return decode_batch(batch, spec)


@pytest.mark.parametrize("hf, text", [(False, False), (True, True)])
def test_rows_name_their_file_and_row_and_decode_to_the_images_written(tmp_path, hf, text):
    root = tmp_path / "pq"
    write_files(root, "train", [6, 5, 4, 2], hf=hf, text=text)  # 17 rows: 3 files, row groups of 4
    write_files(root, "test", [1, 1, 1, 1], hf=hf, text=text)
    src = load_source(cfg_of(root, "data.id_column=img_id").data)
    assert src.class_names == (("blue", "green", "red", "yellow") if text else ("0", "1", "2", "3"))
    assert src.table["id"][7].as_py() == "train/1_1" and src.split("test").num_rows == 4
    out = decoded(src)
    assert out["ok"].all()
    for i in (0, 9, 16, 20):  # across files and row groups
        c, n = src.table["id"][i].as_py().split("/")[1].split("_")
        assert np.array_equal(out["pixels"][i], decode_image(str(root / ".img" / f"{c}_{n}.png"), DecodeSpec(size=8)))


def test_a_split_column_and_default_ids(tmp_path):
    root = tmp_path / "pq"
    split = {0: {"part": pa.array(["train", "train", "train", "train", "test", "train"])}}
    write_files(root, "all", [3, 2, 1], extra=split)
    src = load_source(cfg_of(root, "data.split_column=part", train="all-00000.parquet", test="all-00000.parquet").data)
    assert src.splits() == ["test", "train"] and src.split("test")["id"].to_pylist() == ["all-00000.parquet/4"]


def test_bad_records_are_counted_skips_or_one_line_errors_naming_file_and_column(tmp_path, caplog):
    root = tmp_path / "pq"
    nulls = {1: {"label": pa.array([1, None, 1, 2, 2, 2], pa.int64())}}
    write_files(root, "train", [6, 5, 4, 2], extra=nulls)
    write_files(root, "test", [1, 1, 1, 1])
    src = counted_skip(lambda *o: cfg_of(root, *o), caplog,
                       "1 of 21 Parquet rows skipped: train-00001.parquet:row 1 (no label)",
                       r"1 of 21 Parquet rows cannot be used, above data.max_bad_fraction")
    assert src.split("train").num_rows == 16
    with pytest.raises(DataError, match=r"train-00000.parquet has no column 'img' \(data.image_column\); its columns: "
                                        r"image, label, img_id"):
        load_source(cfg_of(root, "data.image_column=img").data)
    with pytest.raises(DataError, match=r"column 'img_id' \(data.image_column\) is string, not image bytes"):
        load_source(cfg_of(root, "data.image_column=img_id").data)
    (root / "train-00002.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"Parquet file .*train-00002.parquet cannot be read"):
        load_source(cfg_of(root).data)
    # A row without image bytes is a counted skip when embedded, like an unreadable image.
    empty = tmp_path / "empty"
    write_files(empty, "train", [6, 5, 4, 2], extra={0: {"image": pa.array([None] + [b"x"] * 5, pa.binary())}})
    write_files(empty, "test", [1, 1, 1, 1])
    out = decoded(load_source(cfg_of(empty).data))
    assert not out["ok"][0] and out["error"][0] == "no image bytes in this row (an empty cell)"
    assert out["error"][1] == "not an image: 1 byte of text" and out["ok"][6:].all()


@pytest.mark.ray
def test_a_run_over_parquet_files_through_ray_data(ray_session, tmp_path):
    from raylt.pipeline import run

    root = tmp_path / "pq"
    write_files(root, "train", [6, 5, 4, 2], hf=True)
    write_files(root, "test", [1, 1, 1, 1], hf=True)
    cfg = cfg_of(root, "backbone.name=pixels", "backbone.image_size=8", "embed.shard_size=8", "train.epochs=2",
                 f"store.root={tmp_path / 'store'}", f"train.output_dir={tmp_path / 'out'}", "tracking.enabled=false",
                 "name=pq")
    (result,) = run(cfg)
    assert result.metrics["num_test"] == 4 and result.metrics["overall"] > 0.25  # above chance on colour classes
    # The store holds every row, embedded from the bytes in its Parquet cell.
    import torch

    from raylt.embed.backbones import build_encoder
    from raylt.embed.store import read_store

    table = read_store(next((tmp_path / "store").glob("*/manifest.json")).parent)
    assert table.num_rows == 21 and table["id"].to_pylist() == load_source(cfg.data).table["id"].to_pylist()
    enc = build_encoder(cfg.backbone)
    # train-00000.parquet row 0 is class 0's first image
    direct = enc.encode(torch.from_numpy(np.array(decode_image(str(root / ".img" / "0_0.png"), enc.spec)[None])))
    assert np.allclose(np.asarray(table["embedding"][0].as_py()), direct.numpy()[0], atol=1e-5)
