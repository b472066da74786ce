"""Shared fixtures: one local Ray per session, tiny image trees and split files built on disk."""

from __future__ import annotations

import os
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


def write_image(path: Path, color, size=(40, 30), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    base = np.array(color, dtype=np.float64)[None, None, :] + rng.normal(0, 12, (size[1], size[0], 3))
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).convert(mode).save(path, format=fmt)
    return path


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
