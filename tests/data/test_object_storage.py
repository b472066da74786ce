"""Data on object storage: shards read from a real S3-compatible server (moto's standalone
server, started on loopback), with credentials and endpoint from the usual environment."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, http_process

from raylt.config import load_config
from raylt.data import load_source
from raylt.embed.images import DecodeSpec, decode_batch, decode_image

REPO = Path(__file__).resolve().parents[2]
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(endpoint, a pyarrow file system that may create buckets) of a moto server on loopback."""
    from pyarrow import fs

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with http_process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log,
                      f"http://127.0.0.1:{port}/moto-api/data.json", "the moto S3 server", timeout=60):
        endpoint = f"http://127.0.0.1:{port}"
        yield endpoint, fs.S3FileSystem(endpoint_override=endpoint, access_key=AWS["AWS_ACCESS_KEY_ID"],
                                        secret_key=AWS["AWS_SECRET_ACCESS_KEY"], region="us-east-1",
                                        allow_bucket_creation=True)


def upload(filesystem, local: Path, bucket_prefix: str) -> None:
    for f in sorted(local.glob("*")):
        if f.is_file():
            with filesystem.open_output_stream(f"{bucket_prefix}/{f.name}") as out:
                out.write(f.read_bytes())


def test_parquet_images_on_s3_are_indexed_and_their_cells_read_by_a_task(s3, tmp_path, monkeypatch):
    from test_parquet_images import write_files

    endpoint, filesystem = s3
    local = tmp_path / "pq"
    write_files(local, "train", [6, 5, 4, 2], hf=True)
    write_files(local, "test", [1, 1, 1, 1])
    filesystem.create_dir("pq-bucket")
    upload(filesystem, local, "pq-bucket/export")
    for k, v in {**AWS, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(None, ["data.source=parquet_images", "data.root=s3://pq-bucket/export",
                             "data.splits.train=train-{00000..00002}.parquet", "data.splits.test=test-00000.parquet"])
    src = load_source(cfg.data)
    assert list(src.counts()) == [6, 5, 4, 2] and src.table["id"][0].as_py() == "train-00000.parquet/0"
    assert src.table["path"][0].as_py() == "pq-bucket/export/train-00000.parquet" and src.origin.startswith("s3://")
    # A decode task gets the file system with its arguments (pickled), and reads the cells it names.
    cols = ("path", "parquet_row", "image_column", "id", "label", "split")
    batch = {c: src.table[c].to_numpy(zero_copy_only=False) for c in cols}
    batch["row"] = np.arange(src.table.num_rows)
    out = decode_batch(batch, DecodeSpec(size=8), pickle.loads(pickle.dumps(src.filesystem)))
    assert out["ok"].all()
    assert np.array_equal(out["pixels"][0], decode_image(str(local / ".img" / "0_0.png"), DecodeSpec(size=8)))


@pytest.mark.ray
def test_a_run_over_webdataset_shards_on_s3(s3, tmp_path, monkeypatch):
    """`raylt run` in its own process with its own local Ray, as a user runs it: the endpoint and
    the credentials are in its environment, so in every Ray worker's. The shards are read from
    S3, the store is written to it, and a fit elsewhere (another working copy) reads it back."""
    import torch
    from test_webdataset import write_shards

    from raylt.embed.backbones import build_encoder
    from raylt.embed.store import read_store

    endpoint, filesystem = s3
    local = tmp_path / "wds"
    write_shards(local, "train", [6, 4, 3, 2])
    write_shards(local, "test", [1, 1, 1, 1])
    filesystem.create_dir("wds-bucket")
    upload(filesystem, local, "wds-bucket/shards")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS, AWS_ENDPOINT_URL=endpoint, RAY_AUTH_MODE="disabled")
    out = subprocess.run(
        [sys.executable, "-m", "raylt", "run", "configs/demo.yaml", "data.source=webdataset",
         "data.root=s3://wds-bucket/shards", "data.imbalance_ratio=null", "data.splits.train=train-{000..002}.tar", "data.splits.test=test-000.tar",
         "backbone.image_size=8", "embed.shard_size=8", "train.epochs=2", "tracking.enabled=false", "ray.num_cpus=2",
         "store.root=s3://wds-bucket/store", f"store.staging={tmp_path / 'staging'}",
         f"train.output_dir={tmp_path / 'out'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "testing-secret" not in out.stdout + out.stderr
    metrics = json.loads((tmp_path / "out" / "demo" / "metrics.json").read_text())
    assert metrics["num_test"] == 4 and metrics["overall"] > 0.25
    # The store on S3: its manifest, complete, and every shard it lists, with the bytes of the run's copy.
    store = next((tmp_path / "staging").glob("*/*/manifest.json")).parent
    with filesystem.open_input_stream(f"wds-bucket/store/{store.name}/manifest.json") as f:
        manifest = json.loads(f.read())
    assert manifest["status"] == "complete" and manifest["embedded"] == 19 and manifest["skipped"] == 0
    for name in manifest["files"]:
        with filesystem.open_input_stream(f"wds-bucket/store/{store.name}/{name}") as f:
            assert f.read() == (store / name).read_bytes()
    # A fit elsewhere: another working copy, the store read back from S3 and checked there.
    uri = f"s3://wds-bucket/store/{store.name}"
    fit = subprocess.run(
        [sys.executable, "-m", "raylt", "fit", "--config", "configs/demo.yaml", "--embeddings", uri, "--out", str(tmp_path / "fit"),
         "train.epochs=2", "tracking.enabled=false", "ray.num_cpus=2", f"store.staging={tmp_path / 'elsewhere'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert fit.returncode == 0, (fit.stdout + fit.stderr)[-3000:]
    assert json.loads((tmp_path / "fit" / "metrics.json").read_text())["num_test"] == 4
    assert next((tmp_path / "elsewhere").glob(f"*/{store.name}/manifest.json")).read_text() == \
        (store / "manifest.json").read_text()
    # The same recipe on a third machine: the store is found through the recipes on S3, and reused.
    for k, v in {**AWS, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)
    from raylt.embed.stage import run_embed

    third = run_embed(load_config(REPO / "configs/demo.yaml", [
        "data.source=webdataset", "data.root=s3://wds-bucket/shards", "data.imbalance_ratio=null",
        "data.splits.train=train-{000..002}.tar", "data.splits.test=test-000.tar", "backbone.image_size=8",
        "embed.shard_size=8", "store.root=s3://wds-bucket/store", f"store.staging={tmp_path / 'third'}"]))
    assert third.reused and third.computed_rows == 0 and third.store.name == store.name
    assert third.store.is_relative_to(tmp_path / "third") and read_store(third.store).num_rows == 19
    # Every sample of the shards, in shard order, embedded from its member's bytes.
    src = load_source(load_config(None, ["data.source=webdataset", "data.root=s3://wds-bucket/shards",
                                         "data.splits.train=train-{000..002}.tar", "data.splits.test=test-000.tar"]).data)
    table = read_store(store)
    assert table["id"].to_pylist() == src.table["id"].to_pylist()
    enc = build_encoder(load_config(None, ["backbone.image_size=8"]).backbone)
    direct = enc.encode(torch.from_numpy(np.array(decode_image(str(local / ".tmp" / "red" / "train_0_0000.jpg"), enc.spec)[None])))
    assert np.allclose(np.asarray(table["embedding"][0].as_py()), direct.numpy()[0], atol=1e-5)


def test_object_storage_errors_name_the_uri_and_the_fix(s3, tmp_path, monkeypatch):
    from raylt.embed.inputs import open_embeddings
    from raylt.embed.mirror import Mirror
    from raylt.errors import DataError

    endpoint, filesystem = s3
    for k, v in {**AWS, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)
    filesystem.create_dir("empty-bucket")
    with pytest.raises(DataError, match=r"s3://empty-bucket/store/0123 holds no embedding store \(no manifest.json\)"):
        open_embeddings("s3://empty-bucket/store/0123", staging=str(tmp_path / "staging"))
    mirror = Mirror("s3://no-such-bucket/store", str(tmp_path / "staging"))
    (mirror.local / "recipes").mkdir()
    (mirror.local / "recipes" / "k.json").write_text("{}")
    with pytest.raises(DataError, match=r"cannot (read|write) s3://no-such-bucket/store/recipes \(.*\); check that the "
                                         r"bucket exists"):
        mirror.push("recipes")
