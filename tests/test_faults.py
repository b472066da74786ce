"""Faults on a local Ray: killed actors and workers, interrupted and concurrent runs, a lost
MLflow server, a damaged store. Each run ends with what an untroubled run gives.

Drivers that must be interrupted run as `python -m raylt run` in their own process, joined
to the session's Ray (`ray.address`), as `ray job submit` drivers join a cluster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, http_process, wait_for
from raylt.config import load_config
from raylt.errors import RayltError
from raylt.head.artifact import load_head

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def overrides(tmp: Path, *extra: str) -> list[str]:
    return [f"store.root={tmp / 'store'}", f"train.output_dir={tmp / 'out'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", *extra]


@pytest.fixture(scope="module")
def reference(demo_run):
    """The untroubled demo run (tests/conftest.py): its config, metrics and store."""
    cfg, (recipe, _), tmp = demo_run
    return {"cfg": cfg, "metrics": recipe.metrics, "store": next((tmp / "store").glob("*/manifest.json")).parent}


def actors(name: str, state: str = "ALIVE") -> list[dict]:
    from ray._private import state as ray_state

    return [a for a in ray_state.actors().values() if name in a["ActorClassName"] and a["State"] == state]


def sigkill_actors(name: str) -> list[int]:
    pids = [a["Pid"] for a in actors(name)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoint folders (Ray Train's, and local mode's `checkpoint_local_*`), oldest first
    (`checkpoint_manager_snapshot.json` is not one)."""
    return sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)


def table_by_id(store: Path) -> dict:
    from raylt.embed.store import read_store

    t = read_store(store)
    ids = t["id"].to_pylist()
    assert len(ids) == len(set(ids)), "an image is in the store more than once"
    emb = np.stack(t["embedding"].to_numpy(zero_copy_only=False))
    return dict(zip(ids, map(tuple, emb)))


def test_a_killed_embedding_actor_is_replaced_and_every_image_is_stored_once(reference, tmp_path, monkeypatch):
    from raylt.embed.stage import run_embed
    from raylt.embed.store import EmbeddingStore

    killed, add = [], EmbeddingStore.add

    def add_then_kill(self, *args, **kwargs):
        if not killed:  # the first batch is in: the encoder actor has most of the data still to do
            killed.extend(sigkill_actors("EncodeActor"))
        return add(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddingStore, "add", add_then_kill)
    cfg = load_config(REPO / "configs/demo.yaml", overrides(tmp_path, "embed.batch_size=16"))
    res = run_embed(cfg)
    assert killed, "no encoder actor was running"
    restarted = [a for a in actors("EncodeActor", "DEAD") if a["NumRestarts"] >= 1]
    assert restarted, "the killed actor was never restarted"
    assert res.manifest["embedded"] == res.manifest["num_rows"] and res.manifest["skipped"] == 0
    assert table_by_id(res.store) == table_by_id(reference["store"])


def test_a_damaged_store_is_found_by_checksum_and_rebuilt(reference, tmp_path, caplog):
    import shutil

    from raylt.embed.stage import run_embed
    from raylt.embed.inputs import open_embeddings

    cfg = load_config(REPO / "configs/demo.yaml", overrides(tmp_path))
    store = tmp_path / "store" / reference["store"].name
    shutil.copytree(reference["store"], store)
    (store / "part-00003.parquet").write_bytes((store / "part-00003.parquet").read_bytes()[:-100])  # cut short
    data = bytearray((store / "part-00005.parquet").read_bytes())
    data[200] ^= 0x01  # one bit flipped: same size, same footer
    (store / "part-00005.parquet").write_bytes(bytes(data))
    with pytest.raises(RayltError, match="is damaged: part-00003.parquet does not match its checksum"):
        open_embeddings(store)
    with caplog.at_level(logging.WARNING, logger="raylt.embed.stage"):
        res = run_embed(cfg)
    assert "2 damaged shard(s) are recomputed: part-00003 (checksum mismatch), part-00005 (checksum mismatch)" in caplog.text
    assert not res.reused and res.computed_rows == 128  # those two shards of 64 only
    assert table_by_id(store) == table_by_id(reference["store"])


def driver(tmp: Path, log: Path, *extra: str, env: dict | None = None, command: str = "run") -> subprocess.Popen:
    """`raylt run` (or another command) of the demo in its own process, joined to the session's Ray."""
    import ray

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", **(env or {})}
    args = [sys.executable, "-m", "raylt", command, str(REPO / "configs/demo.yaml"), *overrides(tmp),
            f"ray.address={ray.get_runtime_context().gcs_address}", *extra]
    # SIGINT at its default: a shell that starts a job in the background ignores it, and
    # Python keeps an inherited SIG_IGN.
    return subprocess.Popen(args, cwd=tmp, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_interrupted_runs_resume_and_end_with_the_same_metrics(reference, tmp_path):
    """SIGINT then SIGKILL during embedding, SIGINT then SIGKILL during training (Ray Train's
    local mode, the default on one node), then a run to the end: finished shards and
    checkpoints are reused, and the metrics are the untroubled run's. Then a fit in a worker
    group whose train worker is killed (Ray Train restarts it from the last checkpoint,
    `train.max_failures`): the same metrics again."""
    # Slower, same numbers: small encoder batches, and Ray Train's controller taking each
    # report after up to 0.3 s, so a signal lands mid-stage in a worker group.
    SLOW = (["embed.batch_size=16", "embed.decode_batch_size=16"], {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.3"})
    store_markers = lambda: list((tmp_path / "store").glob("*/part-*.json"))  # noqa: E731
    checkpoints = lambda out="out": checkpoint_dirs(tmp_path / out / "demo" / "train")  # noqa: E731
    logs = []

    def interrupt(sig: int, what: str, ready) -> str:
        log = tmp_path / f"run{len(logs)}.log"
        logs.append(log)
        proc = driver(tmp_path, log, *SLOW[0], env=SLOW[1])
        wait_for(what, ready, proc=proc)
        os.kill(proc.pid, sig)
        rc = proc.wait(60)
        with contextlib.suppress(ProcessLookupError):  # what a killed driver left, as a job kill would
            os.killpg(proc.pid, signal.SIGKILL)
        assert rc == (130 if sig == signal.SIGINT else -signal.SIGKILL), log.read_text()[-3000:]
        return log.read_text()

    def metrics(out: str) -> dict:
        return json.loads((tmp_path / out / "demo" / "metrics.json").read_text())

    text = interrupt(signal.SIGINT, "a first shard", lambda: len(store_markers()) >= 1)
    assert "raylt: interrupted" in text
    done = len(store_markers())
    text = interrupt(signal.SIGKILL, "a further shard", lambda: len(store_markers()) > done)
    assert "of 14 shards" in text and "(14 of 14 shards)" not in text  # resumed, not started over
    text = interrupt(signal.SIGINT, "a first checkpoint", lambda: checkpoints())
    assert "is complete: reused" in text or "of 14 shards" in text
    first = checkpoints()
    # A local-mode epoch of the demo takes milliseconds: the kill may land after the last one.
    # Either way the next run takes up from the newest checkpoint.
    interrupt(signal.SIGKILL, "a later checkpoint", lambda: checkpoints() and checkpoints()[-1] not in first)
    assert not (tmp_path / "out" / "demo" / "metrics.json").exists()
    last = driver(tmp_path, tmp_path / "last.log", *SLOW[0], env=SLOW[1])
    assert last.wait(300) == 0, (tmp_path / "last.log").read_text()[-3000:]
    assert metrics("out")["per_class"] == reference["metrics"]["per_class"]
    assert table_by_id(next((tmp_path / "store").glob("*/manifest.json")).parent) == table_by_id(reference["store"])

    # A worker group of one (its reports slowed, so there are epochs left after the first
    # checkpoint): its train worker is killed, and Ray Train restarts it from that checkpoint.
    killed = []

    def kill_worker():
        wait_for("a first checkpoint", lambda: checkpoints("out2"), timeout=240)
        killed.extend(sigkill_actors("RayTrainWorker"))

    watcher = threading.Thread(target=kill_worker, daemon=True)
    log = tmp_path / "group.log"
    group = driver(tmp_path, log, *SLOW[0], "train.num_workers=1", f"train.output_dir={tmp_path / 'out2'}",
                   env=SLOW[1])
    watcher.start()
    assert group.wait(300) == 0, log.read_text()[-3000:]
    watcher.join(5)
    assert killed and any(a["Pid"] in killed for a in actors("RayTrainWorker", "DEAD"))
    assert metrics("out2")["per_class"] == reference["metrics"]["per_class"]


def test_an_unreachable_mlflow_server_stops_the_run_before_any_work(tmp_path, capsys):
    from raylt.cli import main

    port = free_port()
    t0 = time.monotonic()
    rc = main(["run", str(REPO / "configs/demo.yaml"), f"store.root={tmp_path / 'store'}",
               f"tracking.uri=http://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == (f"raylt: error: MLflow tracking server http://127.0.0.1:{port} is unreachable "
                                   "(ConnectionError); start it, fix tracking.uri (or MLFLOW_TRACKING_URI), or set "
                                   "tracking.enabled=false")
    assert not (tmp_path / "store").exists() and time.monotonic() - t0 < 30


def mlflow_server(root: Path, port: int):
    """`mlflow server` on loopback over a SQLite database in `root`, stopped on exit."""
    return http_process(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts")],
        root / f"server-{time.monotonic_ns()}.log", f"http://127.0.0.1:{port}/health", "the MLflow server", timeout=90)


def test_a_lost_mlflow_server_costs_the_log_not_the_run(reference, tmp_path, caplog, monkeypatch):
    import mlflow

    from raylt.cli import main
    from raylt.embed.inputs import open_embeddings
    from raylt.pipeline import fit

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    port, out = free_port(), tmp_path / "fit"
    cfg = load_config(REPO / "configs/demo.yaml", [*overrides(tmp_path), f"tracking.uri=http://127.0.0.1:{port}"])
    with mlflow_server(tmp_path, port) as server:
        def stop_after_first_checkpoint():
            wait_for("a checkpoint", lambda: checkpoint_dirs(out / "train"), timeout=180)
            os.killpg(server.pid, signal.SIGKILL)

        killer = threading.Thread(target=stop_after_first_checkpoint, daemon=True)
        killer.start()
        with caplog.at_level(logging.WARNING, logger="raylt.tracking.runs"):
            res = fit(cfg, open_embeddings(reference["store"]), out)
        killer.join(5)
    assert res.model_uri is None and res.metrics["per_class"] == reference["metrics"]["per_class"]
    assert {"metrics.json", "head.npz", "per_class.png", "run.json", "config.yaml"} <= {p.name for p in out.iterdir()}
    assert f"`raylt log {out}` logs them once it is back" in caplog.text
    with mlflow_server(tmp_path, port):
        assert main(["log", str(out)]) == 0
        mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
        run = mlflow.get_run(res.run_id)  # the same run, now complete
        assert run.info.status == "FINISHED"
        assert run.data.metrics["test_overall"] == pytest.approx(res.metrics["overall"])
        assert run.data.params["train.epochs"] == str(cfg.train.epochs)
        assert json.loads((out / "run.json").read_text())["logged"] is True
        model = mlflow.pyfunc.load_model(f"runs:/{res.run_id}/model")
        dim = load_head(out / "head.npz").dim
        names = json.loads((out / "model_meta.json").read_text())["class_names"]
        assert list(model.predict(np.ones((2, dim), np.float32)).columns) == names


def test_two_runs_at_once_share_the_store_safely_and_never_share_an_output_folder(reference, tmp_path):
    from raylt.embed.inputs import open_embeddings
    from raylt.ops.locks import file_lock
    from raylt.pipeline import fit

    procs = {name: driver(tmp_path, tmp_path / f"{name}.log", "tracking.enabled=false",
                          "embed.batch_size=16", command="embed")
             for name in ("a", "b")}
    for name, proc in procs.items():
        assert proc.wait(300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    logs = [(tmp_path / f"{n}.log").read_text() for n in procs]
    # One embedded the data set; the other waited for the store, then reused it.
    assert sum("is complete: reused" in t for t in logs) == 1 and sum("is in use by" in t for t in logs) == 1, logs
    assert table_by_id(next((tmp_path / "store").glob("*/manifest.json")).parent) == table_by_id(reference["store"])
    # The same output folder twice at once is refused, in one line, before any work.
    out = tmp_path / "out" / "a"
    with file_lock(out / ".lock", "held by the test", wait=False):
        with pytest.raises(RayltError, match=f"output folder {out} is in use by run pid {os.getpid()}"):
            fit(reference["cfg"], open_embeddings(reference["store"]), out)


def test_a_damaged_class_statistics_cache_is_computed_again(reference, tmp_path, caplog):
    from raylt.embed.inputs import open_embeddings
    from raylt.latent.stats_ray import class_stats

    es = open_embeddings(reference["store"])
    first, path = class_stats(es, 4, "identity", tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy cut short
    with caplog.at_level(logging.WARNING, logger="raylt.latent.stats_ray"):
        again, same = class_stats(es, 4, "identity", tmp_path)
    assert same == path and f"class statistics {path} are damaged" in caplog.text
    assert np.array_equal(again.means, first.means) and np.array_equal(again.counts, first.counts)
