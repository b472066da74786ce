"""The `raylt` command as a user runs it: a separate process, its output and exit status."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _tracking_in_tmp(tmp_path, monkeypatch):
    # The commands run in the repository: keep their MLflow database out of it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'default-mlflow.db'}")


def raylt(*args, timeout=300):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([sys.executable, "-m", "raylt", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_config_prints_resolved_yaml_with_overrides():
    out = raylt("config", "configs/demo.yaml", "embed.batch_size=7")
    assert out.returncode == 0, out.stderr
    assert "batch_size: 7" in out.stdout and "source: demo" in out.stdout and "name: pixels" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["config", "configs/demo.yaml", "embed.batch_sise=3"],
         "raylt: error: unknown config key 'embed.batch_sise' on the command line (did you mean 'embed.batch_size'?)"),
        (["config", "configs/places_lt.yaml"], "raylt: error: config key 'data.root' is required but not set in file"),
        (["embed", "configs/demo.yaml", "backbone.name=clip"], "raylt: error: unknown backbone 'clip'"),
        (["config", "configs/nope.yaml"], "raylt: error: config file"),
    ],
)
def test_errors_are_one_line_without_traceback(args, message, monkeypatch):
    monkeypatch.delenv("PLACES_ROOT", raising=False)
    out = raylt(*args)
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.strip().splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith(message), out.stderr
    assert out.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in out.stderr


def test_misspelt_key_in_a_config_file_names_the_file(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text(f"base: {REPO / 'configs' / 'demo.yaml'}\nembed:\n  shard_sise: 3\n")
    out = raylt("config", str(f))
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"raylt: error: unknown config key 'embed.shard_sise' in file {f} (did you mean 'embed.shard_size'?)"
    )


def test_list_shows_registries_and_configs():
    out = raylt("list")
    assert out.returncode == 0
    for word in ("open_clip", "pixels", "split_file", "folder", "cifar100", "demo", "places_lt.yaml", "free_lunch",
                 "balanced_softmax", "ip_dpp", "random_cap", "bns", "instance", "text", "mean"):
        assert word in out.stdout


def test_list_models_names_open_clip_architectures():
    out = raylt("list", "--models")
    assert out.returncode == 0 and "ViT-B-16" in out.stdout and "raylt-tiny-vit" in out.stdout
    assert "ViT-B-16-quickgelu / openai" in out.stdout


@pytest.mark.ray
def test_embed_demo_writes_a_reusable_store_and_logs_an_mlflow_run(tmp_path):
    import mlflow

    db = tmp_path / "mlflow.db"
    first = raylt("embed", "configs/demo.yaml", f"store.root={tmp_path / 'store'}", f"tracking.uri=sqlite:///{db}",
                  "embed.batch_size=100")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "embeddings: 877 (D=768), skipped: 0" in first.stdout
    assert "embedded: 877/877 images" in first.stderr and "14/14 shards written" in first.stderr  # progress
    store = Path(first.stdout.splitlines()[0].removeprefix("store: "))
    assert (store / "manifest.json").is_file() and store.parent == tmp_path / "store"
    run_id = first.stdout.strip().splitlines()[-1].split()[2]
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    run = client.get_run(run_id)
    assert run.data.params["embed.batch_size"] == "100" and run.data.params["data.source"] == "demo"
    assert run.data.metrics["embed_embedded"] == 877 and run.data.metrics["embed_skipped"] == 0
    assert client.get_experiment(run.info.experiment_id).name == "demo"
    from urllib.parse import urlparse

    artifacts = Path(urlparse(run.info.artifact_uri).path)
    assert artifacts.is_relative_to(tmp_path / "mlartifacts")  # beside the database, not in the cwd
    manifest = artifacts / "embedding_store" / "manifest.json"
    assert manifest.is_file() and '"embedded": 877' in manifest.read_text()
    assert run.data.tags["raylt.store"] in first.stdout
    # The batch size does not change the vectors: the same store is reused.
    again = raylt("embed", "configs/demo.yaml", f"store.root={tmp_path / 'store'}", "tracking.enabled=false")
    assert again.returncode == 0 and "reused" in again.stdout
    assert again.stdout.splitlines()[0] == first.stdout.splitlines()[0]
