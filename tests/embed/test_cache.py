"""The image cache (raylt.embed.cache): an image embedded once by an encoder is not embedded
again, whichever data set names it."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import COLORS, write_image

from raylt.config import load_config
from raylt.embed.stage import run_embed
from raylt.embed.store import read_store

pytestmark = pytest.mark.ray


def cfg_of(root, store, *extra):
    return load_config(None, ["data.source=folder", f"data.root={root}", f"store.root={store}", "backbone.name=pixels",
                              "backbone.image_size=8", "embed.shard_size=6", "embed.batch_size=4", *extra])


def by_id(store):
    t = read_store(store)
    return dict(zip(t["id"].to_pylist(), np.stack(t["embedding"].to_numpy(zero_copy_only=False))))


def test_added_images_are_the_only_ones_embedded_and_a_second_data_set_reuses_the_first(
        ray_session, image_tree, tmp_path, caplog):
    first = run_embed(cfg_of(image_tree, tmp_path / "store"))
    assert first.encoded_rows == 26 and first.computed_rows == 26
    # Three new images: a new data set (fingerprint), whose 26 known images come from the cache.
    for i in range(3):
        write_image(image_tree / "train" / "yellow" / f"new{i}.png", COLORS[3])
    with caplog.at_level(logging.INFO, logger="raylt.embed.stage"):
        grown = run_embed(cfg_of(image_tree, tmp_path / "store"))
    assert grown.store != first.store and grown.computed_rows == 29 and grown.encoded_rows == 3
    assert "26 of 29 images were in the image cache" in caplog.text
    # The same vectors as a run without a cache (another store root).
    fresh = run_embed(cfg_of(image_tree, tmp_path / "fresh"))
    assert fresh.encoded_rows == 29
    got, want = by_id(grown.store), by_id(fresh.store)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    # Another data set naming the same images (a copy elsewhere, other ids): nothing encoded.
    copy = tmp_path / "copy"
    shutil.copytree(image_tree, copy)
    shutil.rmtree(copy / "test")
    other = run_embed(cfg_of(copy, tmp_path / "store", "data.splits.train=train"))
    assert other.encoded_rows == 0 and other.computed_rows == 21
    # A cache file cut short is left out with a warning: its images are embedded again.
    for f in (tmp_path / "store" / "images").glob("*/part-*.parquet"):
        f.write_bytes(f.read_bytes()[:50])
    with caplog.at_level(logging.WARNING, logger="raylt.embed.cache"):
        again = run_embed(cfg_of(copy, tmp_path / "store", "data.splits.train=train", "embed.shard_size=7"))
    assert "cannot be read and is removed: its images are embedded again" in caplog.text
    assert again.encoded_rows == 21


def test_two_runs_sharing_the_image_cache_at_once_and_a_killed_append_leave_it_valid(ray_session, image_tree, tmp_path):
    """Two data sets with common images embedded at the same time into one store root (so one
    image cache), with what a SIGKILL between an append's write and its rename leaves in the
    cache: both stores hold what a run without a cache gives, and a third data set of the same
    images encodes nothing."""
    import ray

    other = tmp_path / "other"
    shutil.copytree(image_tree, other)
    for i in range(3):
        write_image(other / "train" / "yellow" / f"new{i}.png", COLORS[3])
    cache = tmp_path / "store" / "images"
    first = run_embed(cfg_of(image_tree, tmp_path / "warm", "data.splits.train=train"))  # the cache's key folder
    key = next((tmp_path / "warm" / "images").iterdir()).name
    (cache / key).mkdir(parents=True)
    (cache / key / ".part-0123.parquet.tmp-999999").write_bytes(b"PAR1 half an append")  # killed before its rename
    args = ["data.source=folder", f"store.root={tmp_path / 'store'}", "backbone.name=pixels", "backbone.image_size=8",
            "embed.shard_size=6", "embed.batch_size=4", "tracking.enabled=false",
            f"ray.address={ray.get_runtime_context().gcs_address}"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    procs = {root.name: subprocess.Popen([sys.executable, "-m", "raylt", "embed", *args, f"data.root={root}"], env=env,
                                         cwd=tmp_path, stdout=open(tmp_path / f"{root.name}.log", "w"),
                                         stderr=subprocess.STDOUT) for root in (image_tree, other)}
    for name, proc in procs.items():
        assert proc.wait(300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    stores = {Path(line.split("store: ", 1)[1]) for name in procs for line in
              (tmp_path / f"{name}.log").read_text().splitlines() if line.startswith("store: ")}
    assert len(stores) == 2
    for store in stores:
        root = image_tree if len(by_id(store)) == 26 else other
        want = by_id(run_embed(cfg_of(root, tmp_path / f"fresh-{root.name}")).store)
        got = by_id(store)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    # Every cache file reads; a third data set naming the same images encodes none of them.
    copy = tmp_path / "copy"
    shutil.copytree(other, copy)
    shutil.rmtree(copy / "test")  # another data set: its train split alone
    third = run_embed(cfg_of(copy, tmp_path / "store", "data.splits.train=train"))
    assert third.encoded_rows == 0 and third.computed_rows == 21 and first.encoded_rows == 18


def test_a_grown_stores_class_statistics_reuse_the_old_blocks_and_equal_a_full_recompute(
        ray_session, image_tree, tmp_path, caplog):
    from raylt.embed.inputs import open_embeddings
    from raylt.latent.stats_ray import class_stats, reduce_moments, store_blocks

    def stats_of(store):
        es = open_embeddings(store)
        with caplog.at_level(logging.INFO, logger="raylt.latent.stats_ray"):
            caplog.clear()
            moments, _ = class_stats(es, 2, "identity", tmp_path / "fit" / store.name)
        # The same files reduced from scratch, nothing kept: the reference.
        whole = reduce_moments(list(es.files), es.num_classes, 2)
        # Without Ray (a small fit on one machine), from scratch and from the kept blocks: the same tree.
        assert same(reduce_moments(list(es.files), es.num_classes, 2, in_process=True), whole)
        here = reduce_moments(list(es.files), es.num_classes, 2, blocks=store_blocks(es, 2, "identity"), in_process=True)
        assert same(here, whole)
        return es, moments, whole

    def same(a, b):
        return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("counts", "means", "pooled", "roots", "traces"))

    train = ["data.splits.train=train", "embed.shard_size=3"]  # 18 rows: 6 full shards
    old = run_embed(cfg_of(image_tree, tmp_path / "store", *train))
    es, kept, whole = stats_of(old.store)
    assert same(kept, whole) and store_blocks(es, 2, "identity").present() == {(0, 4), (4, 6)}
    # Three more yellow images: rows 18-20, the last rows of the source; the first 6 shards are unchanged.
    for i in range(3):
        write_image(image_tree / "train" / "yellow" / f"new{i}.png", COLORS[3])
    grown = run_embed(cfg_of(image_tree, tmp_path / "store", *train))
    assert grown.store != old.store and grown.encoded_rows == 3
    es, merged, whole = stats_of(grown.store)
    assert "the moments of 6 of 7 files kept from" in caplog.text
    assert list(merged.counts) == [3, 5, 8, 5] and same(merged, whole)  # value for value, roots included
    # One more (a partial last shard): the block holding it is not kept, the one before it is.
    write_image(image_tree / "train" / "yellow" / "new3.png", COLORS[3])
    again = run_embed(cfg_of(image_tree, tmp_path / "store", *train))
    es, merged, whole = stats_of(again.store)
    assert "the moments of 7 of 8 files kept from" in caplog.text and same(merged, whole)
    assert (0, 8) not in store_blocks(es, 2, "identity").present()
    # A kept block cut short is read again, with a warning, and the result does not change.
    for f in (tmp_path / "store" / "moments").glob("block-*.npz"):
        f.write_bytes(f.read_bytes()[:100])
    shutil.rmtree(tmp_path / "fit")
    with caplog.at_level(logging.WARNING, logger="raylt.latent.blocks"):
        es, merged, whole = stats_of(again.store)
    assert "are damaged" in caplog.text and same(merged, whole)
