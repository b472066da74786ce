"""Finding a finished store from the config alone (raylt.embed.recipe), without torch or Ray."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from raylt.config import load_config
from raylt.data import load_source
from raylt.embed.recipe import finished_store, local_precision, recipe_key
from raylt.errors import BackboneError


def cfg_of(*extra):
    return load_config(None, ["data.source=folder", "data.root=/nowhere", "backbone.name=pixels", *extra])


def test_the_precision_is_told_here_only_when_no_cluster_decides_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # no Ray in this process (the suite's may be up)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert local_precision(cfg_of("embed.precision=bf16", "ray.address=10.0.0.1:6379")) == "bf16"
    assert local_precision(cfg_of("ray.address=10.0.0.1:6379")) is None  # the cluster's GPUs decide
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # as `ray job submit` sets it
    assert local_precision(cfg_of()) is None
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert local_precision(cfg_of()) == "fp32"


def test_the_key_follows_what_changes_the_vectors_and_not_where_weights_are_cached(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"one")
    base = cfg_of("backbone.name=open_clip", "backbone.model=raylt-tiny-vit", f"backbone.pretrained={weights}")
    key = recipe_key(base, "data1", "fp32")
    assert recipe_key(cfg_of("backbone.name=open_clip", "backbone.model=raylt-tiny-vit", f"backbone.pretrained={weights}",
                             "backbone.cache_dir=/elsewhere", "backbone.offline=true"), "data1", "fp32") == key
    assert len({key, recipe_key(base, "data2", "fp32"), recipe_key(base, "data1", "bf16"),
                recipe_key(load_config(None, ["data.source=folder", "data.root=/nowhere", "embed.shard_size=7",
                                              "backbone.name=open_clip", "backbone.model=raylt-tiny-vit",
                                              f"backbone.pretrained={weights}"]), "data1", "fp32")}) == 4
    weights.write_bytes(b"two")  # other weights at the same path
    assert recipe_key(base, "data1", "fp32") != key
    weights.unlink()
    with pytest.raises(BackboneError, match="weight file .* does not exist"):
        recipe_key(base, "data1", "fp32")


@pytest.mark.ray
def test_a_finished_store_is_found_checked_and_reused_without_torch_or_ray(ray_session, image_tree, tmp_path,
                                                                          caplog):
    from raylt.embed.stage import run_embed

    overrides = ["data.source=folder", f"data.root={image_tree}", f"store.root={tmp_path / 'store'}",
                 "backbone.name=pixels", "backbone.image_size=8", "embed.shard_size=6", "tracking.enabled=false"]
    cfg = load_config(None, overrides)
    first = run_embed(cfg)
    assert finished_store(cfg, load_source(cfg.data)).path == first.store
    entry = json.loads(next((tmp_path / "store" / "recipes").glob("*.json")).read_text())
    assert entry == {"store": first.store.name}
    # `raylt embed` in a fresh process: the store is reused, and neither torch nor Ray is imported.
    code = ("import sys; from raylt.cli import main; rc = main(['embed', *sys.argv[1:]]); "
            "print(rc, 'torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True, timeout=120,
                         env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [f"store: {first.store}", "embeddings: 26 (D=192), skipped: 0, reused",
                                       "0 False False"]
    # A damaged record (cut short, or edited to name no folder beside it): ignored with a
    # warning; the full path finds the store by its inputs and writes the record again.
    record = next((tmp_path / "store" / "recipes").glob("*.json"))
    for damage in ('{"store": "cc7', '["x"]', '{"store": "../../elsewhere"}'):
        record.write_text(damage)
        with caplog.at_level(logging.WARNING, logger="raylt.embed.store"):
            assert finished_store(cfg, load_source(cfg.data)) is None
        assert f"{record} is damaged" in caplog.text
        caplog.clear()
        again = run_embed(cfg)
        assert again.reused and again.store == first.store
        assert json.loads(record.read_text()) == {"store": first.store.name}
    # A damaged shard, a store moved away, another data set: not found here; the full path decides.
    shard = first.store / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert finished_store(cfg, load_source(cfg.data)) is None
    assert run_embed(cfg).computed_rows == 6 and finished_store(cfg, load_source(cfg.data)).path == first.store
    first.store.rename(tmp_path / "store" / "moved")
    assert finished_store(cfg, load_source(cfg.data)) is None
    (image_tree / "train" / "red" / "0.png").rename(image_tree / "train" / "red" / "new.png")
    assert finished_store(cfg, load_source(cfg.data)) is None
