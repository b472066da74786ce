"""The embedding stage through real Ray Data on a session-scoped local Ray."""

import json

import numpy as np
import pytest
import torch
from conftest import COLORS, write_image

from raylt.config import load_config
from raylt.data import load_source
from raylt.embed.backbones import build_encoder
from raylt.embed.images import decode_image
from raylt.embed.stage import run_embed
from raylt.embed.store import read_store
from raylt.errors import DataError

pytestmark = pytest.mark.ray


def folder_cfg(root, store, *extra):
    return load_config(None, [
        "data.source=folder", f"data.root={root}", f"store.root={store}",
        "backbone.name=pixels", "backbone.image_size=8", "embed.shard_size=6", "embed.batch_size=4",
        "embed.decode_batch_size=3", *extra,
    ])


def as_matrix(table):
    return np.stack(table["embedding"].to_numpy(zero_copy_only=False))


def test_embeddings_match_a_direct_encode_of_each_image(ray_session, image_tree, tmp_path):
    cfg = folder_cfg(image_tree, tmp_path / "store")
    res = run_embed(cfg)
    assert not res.reused and res.computed_rows == 26
    man = res.manifest
    assert man["status"] == "complete" and man["embedded"] == 26 and man["skipped"] == 0 and man["dim"] == 192
    assert man["split_rows"] == {"train": 18, "test": 8} and man["class_names"] == ["blue", "green", "red", "yellow"]
    assert man["inputs"]["backbone"] == {"backbone": "pixels", "size": 8, "weights": "none"}
    table = read_store(res.store)
    src = load_source(cfg.data)
    assert table["id"].to_pylist() == src.table["id"].to_pylist()
    assert table["label"].to_pylist() == src.table["label"].to_pylist()
    enc = build_encoder(cfg.backbone)
    direct = enc.encode(torch.from_numpy(np.stack([decode_image(p, enc.spec) for p in src.table["path"].to_pylist()])))
    got = as_matrix(table)
    assert got.dtype == np.float32 and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert np.allclose(got, direct.numpy(), atol=1e-5)
    # pixel features separate the colour classes: every test image's nearest train image shares its label
    train, test = table["split"].to_numpy(zero_copy_only=False) == "train", table["split"].to_numpy(zero_copy_only=False) == "test"
    labels = table["label"].to_numpy()
    nn = np.argmax(got[test] @ got[train].T, axis=1)
    assert np.array_equal(labels[train][nn], labels[test])


def test_rerun_reuses_the_store_and_resume_recomputes_only_lost_shards(ray_session, image_tree, tmp_path, monkeypatch):
    import raylt.embed.stage as stage

    cfg = folder_cfg(image_tree, tmp_path / "store")
    first = run_embed(cfg)
    before = {p.name: p.stat().st_mtime_ns for p in first.store.glob("part-*")}
    build = stage.build_encoder
    with monkeypatch.context() as m:  # a finished store is found from the config alone (raylt.embed.recipe)
        m.setattr(stage, "build_encoder", lambda *a: pytest.fail("the encoder was built for a finished store"))
        again = run_embed(cfg)
    assert again.reused and again.computed_rows == 0 and again.store == first.store
    assert stage.build_encoder is build
    assert {p.name: p.stat().st_mtime_ns for p in first.store.glob("part-*")} == before
    # An interrupted run: the store is unfinished and shard 2 never got written.
    man = json.loads((first.store / "manifest.json").read_text())
    (first.store / "manifest.json").write_text(json.dumps({**man, "status": "incomplete"}))
    (first.store / "part-00002.parquet").unlink()
    (first.store / "part-00002.json").unlink()
    resumed = run_embed(cfg)
    assert not resumed.reused and resumed.computed_rows == 6
    assert {p.name: p.stat().st_mtime_ns for p in first.store.glob("part-*") if "00002" not in p.name} == {
        k: v for k, v in before.items() if "00002" not in k
    }
    assert np.array_equal(as_matrix(read_store(first.store)), as_matrix(read_store(resumed.store)))
    assert resumed.manifest["embedded"] == 26


def test_another_model_gets_its_own_store(ray_session, image_tree, tmp_path):
    pixels = run_embed(folder_cfg(image_tree, tmp_path / "store"))
    tiny = run_embed(folder_cfg(image_tree, tmp_path / "store", "backbone.name=open_clip", "backbone.model=raylt-tiny-vit"))
    assert tiny.store != pixels.store and tiny.store.parent == pixels.store.parent
    assert tiny.manifest["dim"] == 32 and pixels.manifest["dim"] == 192
    assert tiny.manifest["inputs"]["backbone"]["model"] == "raylt-tiny-vit"
    assert read_store(pixels.store).num_rows == 26 == read_store(tiny.store).num_rows


def test_unreadable_images_are_counted_refused_above_the_limit_then_retried(ray_session, image_tree, tmp_path):
    bad = [image_tree / "train" / "red" / "0.png", image_tree / "train" / "blue" / "1.png"]
    for p in bad:
        p.write_bytes(b"\x89PNG broken")
    cfg = folder_cfg(image_tree, tmp_path / "store", "data.max_bad_fraction=0.01")
    with pytest.raises(DataError) as e:
        run_embed(cfg)
    msg = str(e.value)
    # 1% of 26 allows none, so the run stops at the first unreadable image, naming it.
    assert "1 of 26 images already could not be read, above data.max_bad_fraction=0.01" in msg
    assert ("train/red/0.png" in msg or "train/blue/1.png" in msg) and "\n" not in msg
    assert "(a damaged PNG file (11 bytes): its header cannot be read)" in msg
    # Once the images are fixed, the same store completes with every image.
    for p in bad:
        write_image(p, (200, 0, 0))
    fixed = run_embed(cfg)
    assert fixed.manifest["skipped"] == 0 and fixed.manifest["embedded"] == 26
    assert fixed.store == run_embed(cfg).store


def test_unreadable_images_under_the_limit_are_skipped_and_reported(ray_session, image_tree, tmp_path, caplog):
    bad = [image_tree / "train" / "red" / "0.png", image_tree / "test" / "blue" / "t1.jpg"]
    bad[0].write_bytes(b"")
    bad[1].write_bytes(b"\xff\xd8 truncated jpeg")
    with caplog.at_level("WARNING", logger="raylt.embed.stage"):
        res = run_embed(folder_cfg(image_tree, tmp_path / "store", "data.max_bad_fraction=0.1"))
    assert "2 unreadable images skipped, e.g." in caplog.text and "train/red/0.png (" in caplog.text
    assert res.manifest["skipped"] == 2 and res.manifest["embedded"] == 24
    ids = read_store(res.store)["id"].to_pylist()
    assert "train/red/0.png" not in ids and "test/blue/t1.jpg" not in ids and len(ids) == 24
    markers = [json.loads(p.read_text()) for p in res.store.glob("part-*.json")]
    assert sorted(s["id"] for m in markers for s in m["skipped"]) == ["test/blue/t1.jpg", "train/red/0.png"]
    # Fixed since: a finished store keeps its skips until asked (`raylt embed --retry-skipped`),
    # which embeds again the shards that skipped images, and only those.
    write_image(bad[0], COLORS[0])
    write_image(bad[1], COLORS[2])
    cfg = folder_cfg(image_tree, tmp_path / "store", "data.max_bad_fraction=0.1")
    assert run_embed(cfg).reused and read_store(res.store).num_rows == 24
    shards_with_skips = sorted(p.name for p in res.store.glob("part-*.json") if json.loads(p.read_text())["skipped"])
    untouched = {p.name: p.stat().st_mtime_ns for p in res.store.glob("part-*.parquet")
                 if p.with_suffix(".json").name not in shards_with_skips}
    again = run_embed(cfg, retry_skipped=True)
    assert not again.reused and again.computed_rows == 6 * len(shards_with_skips)
    assert again.manifest["skipped"] == 0 and again.manifest["embedded"] == 26 and again.store == res.store
    assert {n: (res.store / n).stat().st_mtime_ns for n in untouched} == untouched


def test_demo_config_embeds_offline(ray_session, tmp_path):
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[2] / "configs" / "demo.yaml", [f"store.root={tmp_path}"])
    res = run_embed(cfg)
    src = load_source(cfg.data)
    assert res.manifest["embedded"] == src.table.num_rows and res.manifest["dim"] == 768
    assert res.manifest["class_names"][0] == "zero"


@pytest.mark.parametrize(
    "overrides, cpus, gpus, expected",
    [
        # CPU-only, 2 cores: one actor on both cores' threads, decode pool kept apart from it
        ([], 2, 0, dict(actors=1, gpus_per_actor=0, threads_per_actor=2, decode_tasks=2, precision="fp32", decode="tasks")),
        ([], 16, 0, dict(actors=15, gpus_per_actor=0, threads_per_actor=1, decode_tasks=16, precision="fp32", decode="tasks")),
        # GPUs: one actor per GPU, bf16, all CPUs read and the actors decode JPEGs on their GPU
        ([], 16, 4, dict(actors=4, gpus_per_actor=1, threads_per_actor=4, decode_tasks=16, precision="bf16", decode="actor")),
        # equal pool sizes would let Ray Data fuse decoding into the GPU actors
        ([], 4, 4, dict(actors=4, gpus_per_actor=1, threads_per_actor=1, decode_tasks=5, precision="bf16", decode="actor")),
        (["embed.num_actors=2", "embed.precision=fp16", "embed.threads_per_actor=3", "embed.decode_tasks=6"], 8, 1,
         dict(actors=2, gpus_per_actor=1, threads_per_actor=3, decode_tasks=6, precision="fp16", decode="actor")),
        # decoding where the config says, whatever the cluster
        (["embed.decode=tasks"], 16, 4, dict(actors=4, gpus_per_actor=1, threads_per_actor=4, decode_tasks=16,
                                             precision="bf16", decode="tasks")),
        (["embed.decode=actor"], 2, 0, dict(actors=1, gpus_per_actor=0, threads_per_actor=2, decode_tasks=2,
                                            precision="fp32", decode="actor")),
    ],
)
def test_resource_plan(overrides, cpus, gpus, expected):
    from dataclasses import asdict

    from raylt.embed.stage import plan_resources

    assert asdict(plan_resources(load_config(None, overrides).embed, cpus, gpus)) == expected


def test_class_statistics_reduced_over_store_shards_equal_the_one_shot_moments(ray_session, image_tree, tmp_path):
    from raylt.latent.stats import class_moments, load_moments, save_moments
    from raylt.latent.stats_ray import reduce_store

    res = run_embed(folder_cfg(image_tree, tmp_path / "store"))
    assert res.manifest["num_shards"] == 5  # 26 rows in shards of 6: a real tree of merges
    reduced = reduce_store(res.store, num_classes=4, rank=4)
    train = read_store(res.store, split="train")
    whole = class_moments(as_matrix(train), train["label"].to_numpy(), 4, rank=4)
    assert list(reduced.counts) == [3, 5, 8, 2]
    assert np.allclose(reduced.means, whole.means) and np.allclose(reduced.pooled, whole.pooled)
    for c in range(4):
        assert np.allclose(reduced.class_covariance(c), whole.class_covariance(c))
    save_moments(reduced, tmp_path / "class_stats.npz", res.manifest["class_names"])
    loaded, names = load_moments(tmp_path / "class_stats.npz")
    assert names == ["blue", "green", "red", "yellow"] and np.array_equal(loaded.roots, reduced.roots)
