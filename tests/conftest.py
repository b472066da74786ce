"""Shared fixtures: one local Ray per session, tiny image trees and split files built on disk."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

# The real Places-LT / ImageNet-LT split files live beside the repository, never inside it.
SHARED = Path(os.environ.get("RAYLT_SHARED_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def need_shared(sub: str) -> Path:
    """The shared split-file folder; a skip on a developer's machine without it, a failure in CI."""
    path = SHARED / sub
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must have ../shared beside the repository")
        pytest.skip(f"{path} not found; set RAYLT_SHARED_DATASETS to the shared datasets folder")
    return path


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # address="local" never attaches to a cluster someone started on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024**2,
             log_to_driver=False)
    yield ray
    ray.shutdown()


def wait_for(what: str, ready, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def http_process(args: list[str], log: Path, url: str, what: str, timeout: float = 120, env: dict | None = None):
    """A server process on loopback, ready once GET `url` answers, killed with its children on exit."""
    import requests

    proc = subprocess.Popen(args, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> bool:
        with contextlib.suppress(requests.RequestException):
            return requests.get(url, timeout=1).ok
        return False

    try:
        wait_for(what, up, timeout=timeout, proc=proc)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_image(path: Path, color, size=(40, 30), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    base = np.array(color, dtype=np.float64)[None, None, :] + rng.normal(0, 12, (size[1], size[0], 3))
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).convert(mode).save(path, format=fmt)
    return path


def toy(counts, d=5, seed=0):
    """(x [N, d], y [N]): Gaussian classes of the given sizes around random centres, one shared
    anisotropic spread."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts)
    centres = rng.normal(0, 2, (len(counts), d))
    x = centres[y] + rng.normal(0, 1, (len(y), d)) @ rng.normal(0, 0.5, (d, d))
    return x, y


COLORS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 220, 40)]


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """<root>/{train,test}/<class>/*.png: 4 colour classes, long-tailed train (8, 5, 3, 2)."""
    root = tmp_path / "tree"
    for c, (name, n) in enumerate(zip(["red", "green", "blue", "yellow"], [8, 5, 3, 2])):
        for i in range(n):
            write_image(root / "train" / name / f"{i}.png", COLORS[c])
        for i in range(2):
            write_image(root / "test" / name / f"t{i}.jpg", COLORS[c])
    return root


def demo_overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [f"store.root={tmp_path / 'store'}", *extra]


@pytest.fixture(scope="session")
def demo_run(ray_session, tmp_path_factory):
    """The offline demo, run once: (config, (recipe, baseline) results, its folder). Shared by
    the pipeline tests and, as the untroubled reference, by the fault tests."""
    from raylt.config import load_config
    from raylt.pipeline import run

    tmp = tmp_path_factory.mktemp("demo")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/demo.yaml", [
        f"store.root={tmp / 'store'}", f"train.output_dir={tmp / 'out'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
    ])
    return cfg, run(cfg, baseline=True), tmp


def counted_skip(cfg_of, caplog, reported: str, refused: str):
    """A source with one skipped record: loaded under `data.max_bad_fraction=0.1` it reports the
    skip (`reported`, a part of the warning) and keeps the rest (returned); under the default
    1% it is refused in one line (`refused`, a regex). `cfg_of(*overrides)` makes the config."""
    from raylt.data import load_source
    from raylt.errors import DataError

    with caplog.at_level("WARNING", logger="raylt.data.shards"):
        src = load_source(cfg_of("data.max_bad_fraction=0.1").data)
    assert reported in caplog.text
    with pytest.raises(DataError, match=refused):
        load_source(cfg_of().data)
    return src
