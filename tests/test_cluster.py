"""raylt on a real Ray cluster: `ray start --head` with token authentication and a job submitted
with `ray job submit --working-dir .`, as the README's "On a Ray cluster" section describes."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import COLORS, need_shared, write_image

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def places_lt_tree(tmp: Path, counts=(12, 6, 3, 2), held_out=3) -> tuple[Path, Path]:
    """A Places-LT-format data set of the first len(counts) classes: split files whose lines
    are the real ones from ../shared/datasets/places_lt, and an image written at every path."""
    real = need_shared("places_lt")
    root, splits = tmp / "places365", tmp / "places_lt"
    splits.mkdir(parents=True)
    quota = {"Places_LT_train.txt": counts, "Places_LT_val.txt": (held_out,) * len(counts),
             "Places_LT_test.txt": (held_out,) * len(counts)}
    for name, per_class in quota.items():
        kept, seen = [], [0] * len(counts)
        for line in (real / name).read_text().splitlines():
            rel, label = line.rsplit(" ", 1)
            c = int(label)
            if c < len(counts) and seen[c] < per_class[c]:
                seen[c] += 1
                kept.append(line)
                write_image(root / rel, COLORS[c], size=(48, 36), fmt="JPEG")
        assert seen == list(per_class), f"{name}: the real split file has too few images per class"
        (splits / name).write_text("\n".join(kept) + "\n")
    names = (real / "classnames.txt").read_text().splitlines()[: len(counts)]
    (splits / "classnames.txt").write_text("\n".join(names) + "\n")
    return root, splits


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on loopback with token authentication, in its own process group so that
    stopping it leaves the test session's own Ray alone (`ray stop` would stop every Ray here)."""
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    bindir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # nothing to drain at the end of a test
    gcs, dash, agent, agent_grpc, metrics, rt_env, client = free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rlt-", dir="/tmp")  # unix socket paths must stay short
    log = tmp_path / "ray_head.log"
    head = subprocess.Popen(
        [str(bindir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
         f"--ray-client-server-port={client}", "--num-cpus=2", "--object-store-memory=300000000",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_jobs_api(address, env, head, log)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)  # --block: the head drains and stops what it started
        try:
            head.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)  # whatever is left of its process group
            shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(address: str, env: dict, head: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()[-4000:]}")
        probe = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list", "--address", address],
                               env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise RuntimeError(f"the Ray head at {address} did not answer within {timeout} s:\n{probe.stderr[-2000:]}")


def test_places_lt_job_on_a_ray_cluster_with_token_auth(ray_head, tmp_path):
    import mlflow

    address, env = ray_head
    root, splits = places_lt_tree(tmp_path / "data")
    shared = tmp_path / "shared"  # what every node would mount
    ray_bin = str(Path(sys.executable).parent / "ray")
    overrides = [
        f"data.root={root}", f"data.split_dir={splits}", f"store.root={shared / 'store'}",
        f"train.output_dir={shared / 'outputs'}", f"tracking.uri=sqlite:///{shared / 'mlflow.db'}",
        "backbone.model=raylt-tiny-vit", "backbone.pretrained=null", "backbone.offline=true",
        "embed.batch_size=16", "embed.shard_size=16", "train.epochs=3", "train.batch_size=8",
    ]
    # Without the token the cluster refuses the job.
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    refused = subprocess.run([ray_bin, "job", "list", "--address", address], env=no_token,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0, refused.stdout

    for _ in range(30):  # the jobs API answers before the head's job agent has registered
        job = subprocess.run(
            [ray_bin, "job", "submit", "--address", address, "--working-dir", ".", "--",
             "python", "jobs/places_lt.py", *overrides],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
        if "No available agent to submit job" not in job.stderr:
            break
        time.sleep(2)
    assert job.returncode == 0, (job.stdout + job.stderr)[-6000:]
    assert "succeeded" in job.stdout + job.stderr

    # The run is in the experiment named by the config, at the absolute URI the job was given.
    client = mlflow.tracking.MlflowClient(f"sqlite:///{shared / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("places_lt")
    runs = client.search_runs([experiment.experiment_id])
    fit = [r for r in runs if "test_overall" in r.data.metrics]
    assert len(fit) == 1 and fit[0].info.status == "FINISHED"
    assert fit[0].data.params["backbone.model"] == "raylt-tiny-vit"
    assert {"metrics.json", "per_class.png"} <= {a.path for a in client.list_artifacts(fit[0].info.run_id)}
    metrics = json.loads((shared / "outputs" / "places_lt" / "metrics.json").read_text())
    # The backbone's text tower named the classes: the ensemble weight was chosen on the val
    # split, and the text prior tried (the random tiny model's names predict nothing: off).
    assert metrics["text_ensemble"] == "val" and metrics["text_ensemble_weight"] >= 0
    assert metrics["text_prior"].startswith(("on", "off: the names do not predict"))
    assert list((shared / "store").glob("*/manifest.json"))


def test_two_nodes_give_the_same_metrics_as_one(demo_run, tmp_path):
    """Embedding actors, class-statistics tasks and train workers spread over a two-node
    `ray.cluster_utils.Cluster`; the metrics match a run of the same config on one node (whose
    embeddings are the session demo's store: the embedding settings here do not change them)."""
    from raylt.config import load_config
    from raylt.pipeline import run

    def overrides(where: Path) -> list[str]:
        return [f"store.root={where / 'store'}", f"train.output_dir={where / 'out'}",
                f"tracking.uri=sqlite:///{where / 'mlflow.db'}", "train.num_workers=2",
                "train.placement_strategy=SPREAD", "embed.num_actors=2", "embed.cpus_per_actor=0.5", "train.epochs=5",
                "head.holdout=0"]  # one worker group per run: the holdout's choices are not what is compared

    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "cluster_run.py"), "2", "2", str(two / "run.json"),
                           *overrides(two)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    spread = json.loads((two / "run.json").read_text())
    assert len(spread["nodes"]) == 2
    for stage, nodes in spread["used"].items():
        assert sorted(nodes) == sorted(spread["nodes"]), f"{stage} ran on {len(nodes)} of 2 nodes"

    one = tmp_path / "one"
    (single,) = run(load_config(REPO / "configs/demo.yaml", [*overrides(one), f"store.root={demo_run[2] / 'store'}"]))
    for key in ("overall", "many", "medium", "few", "per_class"):
        assert spread["metrics"][key] == single.metrics[key], key


def test_train_workers_use_the_node_cores_despite_a_fractional_cpu_reservation(ray_session):
    """Ray gives a task reserving half a CPU one OpenMP thread; `worker_threads` restores the
    node's cores, shared among the workers on it, unless a count is asked for."""
    import ray
    import torch

    from raylt.ops.cluster import worker_threads

    @ray.remote(num_cpus=0.5)
    def threads():
        return torch.get_num_threads(), worker_threads(0, 1), worker_threads(0, 2), worker_threads(3, 1)

    cores = min(2, len(os.sched_getaffinity(0)))  # the session's Ray has 2 logical CPUs
    assert ray.get(threads.remote()) == (1, cores, max(1, cores // 2), 3)
