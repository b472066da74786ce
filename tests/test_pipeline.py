"""The whole pipeline on a local Ray: demo images -> store -> stats -> Ray Train head -> MLflow."""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from raylt.config import load_config
from raylt.embed.inputs import open_embeddings, read_split
from raylt.errors import RayltError
from raylt.head.posthoc import TAUS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def test_default_recipe_beats_the_plain_ce_head_on_few_shot_classes(demo_run):
    cfg, (recipe, baseline), _ = demo_run
    assert recipe.metrics["few"] > baseline.metrics["few"] + 0.1, (recipe.metrics, baseline.metrics)
    assert recipe.metrics["overall"] > baseline.metrics["overall"]
    assert recipe.metrics["synthetic_per_epoch"] > 0 and baseline.metrics["synthetic_per_epoch"] == 0
    # The demo has no val split apart from its test split: nothing is chosen on what is
    # reported. Tau and the temperature come from a fit that held out a fifth of each train
    # class with 5+ images (its own Ray Train checkpoints), then the head is fitted on all.
    m, train = recipe.metrics, np.array(recipe.metrics["train_counts"])
    assert m["posthoc_from"] == "holdout" and m["temperature_from"] == "holdout" and m["temperature"] > 0
    assert m["holdout_rows"] == sum(int(n * 0.2) for n in train if n >= 5) and 0 < m["holdout_balanced"] <= 1
    assert (recipe.out / "holdout" / "train").is_dir()
    assert "posthoc" not in baseline.metrics  # the plain head has no offsets
    assert 0.0 <= m["ece"] <= 1.0


def test_metrics_file_and_mlflow_run_agree(demo_run):
    import mlflow

    cfg, (recipe, _), tmp = demo_run
    on_disk = json.loads((recipe.out / "metrics.json").read_text())
    assert on_disk["overall"] == recipe.metrics["overall"] and len(on_disk["per_class"]) == 10
    assert (recipe.out / "per_class.png").stat().st_size > 10_000
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(recipe.run_id)
    assert run.data.metrics["test_overall"] == pytest.approx(on_disk["overall"])
    assert run.data.metrics["test_few"] == pytest.approx(on_disk["few"])
    assert run.data.metrics["test_ece"] == pytest.approx(on_disk["ece"]) and run.data.metrics["temperature"] == pytest.approx(on_disk["temperature"])
    assert run.data.metrics["holdout_rows"] == on_disk["holdout_rows"] > 0
    assert run.data.params["sampler.name"] == "gaussian"
    history = client.get_metric_history(recipe.run_id, "train_loss")
    assert [m.step for m in history] == list(range(cfg.train.epochs))  # one per epoch, from rank 0
    assert history[-1].value < history[0].value
    names = {a.path for a in client.list_artifacts(recipe.run_id)}
    assert {"metrics.json", "per_class.png", "class_stats"} <= names


def test_logged_model_reloads_and_predicts_in_a_fresh_process(demo_run, tmp_path):
    cfg, (recipe, _), tmp = demo_run
    es = open_embeddings(next((tmp / "store").glob("*/manifest.json")).parent)
    x, y = read_split(es, "test")
    np.save(tmp_path / "x.npy", x[:50])
    code = (
        "import sys, numpy as np, mlflow\n"
        f"mlflow.set_tracking_uri('sqlite:///{tmp / 'mlflow.db'}')\n"
        f"p = mlflow.pyfunc.load_model('{recipe.model_uri}').predict(np.load('{tmp_path / 'x.npy'}'))\n"
        "print(list(p.columns)[:2], p.to_numpy().sum(1).min(), ','.join(map(str, p.to_numpy().argmax(1))))\n"
    )
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cols, total, preds = out.stdout.strip().rsplit(" ", 2)[0], float(out.stdout.split()[-2]), out.stdout.split()[-1]
    assert cols.startswith("['zero', 'one']") and total == pytest.approx(1.0, abs=1e-5)
    from raylt.head.artifact import head_logits, load_head

    assert preds == ",".join(map(str, head_logits(load_head(recipe.out / "head.npz"), x[:50]).argmax(1)))


def test_logged_model_predicts_from_image_bytes(demo_run):
    """The demo's backbone needs no weights, so the model embeds images itself."""
    import mlflow
    import pandas as pd
    import pyarrow.compute as pc

    from raylt.data import load_source
    from raylt.head.artifact import head_logits, load_head

    cfg, (recipe, _), tmp = demo_run
    table = load_source(cfg.data).table
    test = table.filter(pc.equal(table["split"], "test")).slice(0, 20)
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    probs = mlflow.pyfunc.load_model(recipe.model_uri).predict(pd.DataFrame({"image": test["image"].to_pylist()}))
    es = open_embeddings(next((tmp / "store").glob("*/manifest.json")).parent)
    x, _ = read_split(es, "test")  # the store keeps source order, so the first 20 test rows match
    assert list(probs.to_numpy().argmax(1)) == list(head_logits(load_head(recipe.out / "head.npz"), x[:20]).argmax(1))


def test_same_config_and_seed_give_the_same_metrics_and_a_rerun_resumes(demo_run):
    from raylt.pipeline import fit

    cfg, (recipe, _), tmp = demo_run
    es = open_embeddings(next((tmp / "store").glob("*/manifest.json")).parent)
    again = fit(cfg, es, tmp / "again")
    assert again.metrics["per_class"] == recipe.metrics["per_class"]
    checkpoints = sorted((recipe.out / "train").glob("checkpoint_*"))
    resumed = fit(cfg, es, recipe.out)  # the same run again: every epoch is checkpointed, none re-run
    assert resumed.metrics["per_class"] == recipe.metrics["per_class"]
    assert sorted((recipe.out / "train").glob("checkpoint_*")) == checkpoints
    other = load_config(REPO / "configs/demo.yaml", [f"train.output_dir={tmp / 'out'}", "head.loss=balanced_softmax",
                                                     f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"])
    with pytest.raises(RayltError, match="different config"):
        fit(other, es, recipe.out)


OWN_COUNTS = np.array([120] * 4 + [30] * 4 + [3] * 8)


def own_embeddings(tmp: Path) -> Path:
    """A Parquet folder of generated embeddings, and beside it (`class_text.parquet`, not in
    the folder) its classes' text embeddings, two rows per class name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylt.testing.simulate import generate, write_parquet

    (x, y, s), _, text = generate("clip_like", OWN_COUNTS, 20, splits=("val", "test"), text="scenes")
    names = [f"kind {i}" for i in range(16)]
    write_parquet(x, y, s, tmp / "emb" / "part-0.parquet", names)
    pq.write_table(pa.table({"label": names * 2, "embedding": [*text.tolist(), *(2 * text).tolist()]}),
                   tmp / "class_text.parquet")
    return tmp / "emb"


@contextlib.contextmanager
def own_processes():
    """An environment whose processes (the command's, and any Ray process it starts, which
    inherit it) carry a marker and keep Ray's files in a folder of their own; yields (env,
    the Ray folder, a function listing the marked processes still alive)."""
    token = uuid.uuid4().hex
    marker = f"RAYLT_TEST_PROCESS={token}".encode()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAYLT_TEST_PROCESS": token}
    env.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)  # as a user's shell has it
    env.pop("RAY_ADDRESS", None)

    def alive() -> list[str]:
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        return found

    # Ray's socket paths must stay under 108 bytes: a short folder, not pytest's.
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as ray_tmp:
        env["RAY_TMPDIR"] = ray_tmp
        yield env, Path(ray_tmp), alive


def test_fit_command_on_own_embeddings_starts_no_ray_and_leaves_no_process(tmp_path):
    emb = own_embeddings(tmp_path)
    with own_processes() as (env, ray_tmp, alive):
        out = subprocess.run(
            [sys.executable, "-m", "raylt", "fit", "--embeddings", str(emb), "--out", str(tmp_path / "o"),
             "--class-names", str(emb / "classnames.txt"), "--baseline", "train.epochs=3",
             "--class-text", str(tmp_path / "class_text.parquet"),
             f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
        )
        # One machine, small inputs: Ray Train's local mode, the class statistics in the driver.
        assert not (ray_tmp / "ray").exists(), "a local Ray was started"
        assert alive() == []
    assert out.returncode == 0, out.stderr[-3000:]
    # The whole console at default verbosity: raylt's own lines, each once (raylt.ops.console).
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert 10 <= len(lines) <= 40, "\n".join(lines)
    assert len(set(lines)) == len(lines), "\n".join(lines)
    forbidden = ("pid=", "core_worker", "Warning", "WARNING", "PlacementGroupCleaner", "State API", "worker.py:",
                 "mlflow.store", "Progress bars", "Created version", "Traceback")
    assert not [ln for ln in lines if any(f in ln for f in forbidden)], "\n".join(lines)
    assert sum(ln.startswith("epoch 3/3: train loss") for ln in lines) == 2  # the recipe's and the baseline's
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["class_names"][:2] == ["kind 0", "kind 1"] and m["num_test"] == 16 * 20 and m["split"] == "test"
    assert "| gaussian sampler, logit_adjusted loss |" in out.stdout and "| baseline: CE head, real only |" in out.stdout
    assert (tmp_path / "o" / "baseline" / "metrics.json").is_file()
    assert m["posthoc"] == "count" and m["posthoc_from"] == "val" and m["posthoc_tau"] in TAUS
    assert m["temperature_from"] == "val" and m["temperature"] > 0 and 0.0 <= m["ece"] <= 1.0
    # The class text brought by the user: its two rows per class averaged, the ensemble weighed on val.
    from raylt.testing.simulate import generate

    *_, text = generate("clip_like", OWN_COUNTS, 20, splits=("val", "test"), text="scenes")
    assert np.allclose(np.load(tmp_path / "o" / "class_text.npy"), text, atol=1e-5)
    assert m["text_ensemble"] == "val" and m["text_ensemble_weight"] >= 0
    assert "text_ensemble" not in json.loads((tmp_path / "o" / "baseline" / "metrics.json").read_text())


def test_a_fit_that_starts_ray_leaves_no_process_of_it(tmp_path):
    """A Ray Train worker group (`train.num_workers=1`) on a local Ray that the command starts:
    raylet, GCS, workers, the train controller and its helpers all end with the command."""
    emb = own_embeddings(tmp_path)
    with own_processes() as (env, ray_tmp, alive):
        out = subprocess.run(
            [sys.executable, "-m", "raylt", "fit", "--embeddings", str(emb), "--out", str(tmp_path / "o"),
             "train.epochs=2", "train.num_workers=1", "tracking.enabled=false", "head.holdout=0"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert list((ray_tmp / "ray").glob("session_*")), "no Ray was started: the test proves nothing"
        left = alive()
        for _ in range(50):  # what the driver's Ray shutdown signalled may take a moment to exit
            if not left:
                break
            time.sleep(0.2)
            left = alive()
        assert left == []
    assert (tmp_path / "o" / "head.npz").is_file()


def test_fit_refuses_bad_embeddings_in_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"embedding": [[0.1, 0.2]], "label": [0]}), tmp_path / "e.parquet")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "raylt", "fit", "--embeddings", str(tmp_path / "e.parquet"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"raylt: error: embeddings file {tmp_path / 'e.parquet'} lacks column(s) ['split']; "
        "it needs ['embedding', 'label', 'split']"
    )


def test_two_ddp_workers_split_real_and_synthetic_embeddings(demo_run):
    import dataclasses

    import mlflow

    from raylt.pipeline import fit

    cfg, (recipe, baseline), tmp = demo_run
    # No holdout fit: what is checked is the worker group's split of the rows, not the recipe's choices.
    two = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=2, cpus_per_worker=0.5),
                              head=dataclasses.replace(cfg.head, holdout=0.0))
    es = open_embeddings(next((tmp / "store").glob("*/manifest.json")).parent)
    res = fit(two, es, tmp / "two_workers")
    assert res.metrics["few"] > baseline.metrics["few"] + 0.1
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    real = client.get_metric_history(res.run_id, "train_real")[-1].value  # rank 0's share
    syn = client.get_metric_history(res.run_id, "train_synthetic")[-1].value
    assert real in (es.train_counts.sum() // 2, es.train_counts.sum() // 2 + 1)  # every row used, none dropped
    assert abs(syn - res.metrics["synthetic_per_epoch"] / 2) <= 1


def test_a_run_with_a_text_tower_computes_caches_logs_and_reuses_the_class_text(ray_session, image_tree, tmp_path,
                                                                                  caplog):
    """The tiny open_clip model's text tower names the classes: the class text is computed once,
    cached in the store, copied beside the head and logged; a second fit reuses it. (Random
    weights: what it is worth is measured in tests/head/test_text.py on generated text.)"""
    import logging

    import mlflow

    from raylt.cli import main
    from raylt.head.text import zero_shot_logits
    from raylt.pipeline import run

    def cfg(out: str):
        return load_config(None, [
            "data.source=folder", f"data.root={image_tree}", f"store.root={tmp_path / 'store'}",
            "backbone.name=open_clip", "backbone.model=raylt-tiny-vit", "backbone.pretrained=null",
            "backbone.offline=true", "head.text_templates=scenes", "train.epochs=2", "embed.shard_size=8",
            f"train.output_dir={tmp_path / out}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])

    with caplog.at_level(logging.INFO, logger="raylt.head.rows"):
        (first,) = run(cfg("a"))
    assert "class text: 4 class names x 8 prompts (scenes) through the text tower" in caplog.text
    (cached,) = list((tmp_path / "store").glob("*/class_text/*.npy"))
    text = np.load(first.out / "class_text.npy")
    assert text.shape == (4, 32) and np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    assert np.array_equal(np.load(cached), text)
    # Four classes teach no map (the prior is off, and says so); a train/test data set has no
    # val rows: the ensemble's weight is chosen on a holdout of the train split.
    assert first.metrics["text_prior"].startswith("off:") and first.metrics["text_ensemble"] == "holdout"
    assert first.metrics["text_ensemble_weight"] >= 0 and 0 <= first.metrics["holdout_balanced_zero_shot"] <= 1
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "class_text.npy" in {a.path for a in client.list_artifacts(first.run_id)}
    # The floor: zero-shot CLIP from that text on the same test split, in the metrics and MLflow.
    zs = first.metrics["zero_shot"]
    x, y = read_split(open_embeddings(cached.parent.parent), "test")
    assert zs["overall"] == pytest.approx((zero_shot_logits(x, text).argmax(1) == y).mean())
    assert client.get_run(first.run_id).data.metrics["test_zero_shot_overall"] == pytest.approx(zs["overall"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="raylt.head.rows"):
        (second,) = run(cfg("b"))
    assert f"class text: reused {cached}" in caplog.text and "through the text tower" not in caplog.text
    assert np.array_equal(np.load(second.out / "class_text.npy"), text)
    # `raylt report` shows the floor once, beside the runs that share it.
    assert main(["report", first.run_id, second.run_id, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                 "--out", str(tmp_path / "report")]) == 0
    lines = (tmp_path / "report" / "report.md").read_text().splitlines()
    assert [ln for ln in lines if "zero-shot" in ln] == [f"| zero-shot CLIP | {zs['overall']:.3f} | "
                                                         + " | ".join("-" if zs[g] is None else f"{zs[g]:.3f}"
                                                                      for g in ("many", "medium", "few"))
                                                         + " | - | - |"]
