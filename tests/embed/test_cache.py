"""The image cache (raylt.embed.cache): an image embedded once by an encoder is not embedded
again, whichever data set names it."""

from __future__ import annotations

import logging
import shutil

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
