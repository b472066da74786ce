"""raylt as an installed package: a wheel of the checkout, installed without the checkout, ships
its configs and model configs, and names a shipped config without a path."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args, cwd, env=None, timeout=300):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding only the wheel (--no-deps); the test venv's site-packages provide
    the dependencies through a path file, which does not run that venv's editable raylt hook."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # the build writes build/ and *.egg-info beside its sources: a copy, not the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((REPO / name).read_bytes())
    for name in ("raylt", "configs"):
        subprocess.run(["cp", "-r", str(REPO / name), str(src / name)], check=True)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
          str(src)], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("raylt-*.whl")
    venv = tmp / "venv"
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp).strip())
    (site / "test-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)], cwd=tmp)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return venv, tmp / "elsewhere", env


def test_the_installed_wheel_lists_and_resolves_its_shipped_configs(installed):
    venv, elsewhere, env = installed
    elsewhere.mkdir(exist_ok=True)
    where = _run([str(venv / "bin" / "python"), "-c", "import raylt; print(raylt.__file__)"], elsewhere, env)
    assert where.startswith(str(venv)), f"raylt came from {where}, not the installed wheel"
    listed = _run([str(venv / "bin" / "raylt"), "list"], elsewhere, env)
    assert str(venv) in listed and "places_lt.yaml" in listed and "data/demo.yaml" in listed
    resolved = _run([str(venv / "bin" / "raylt"), "config", "demo", "train.epochs=3"], elsewhere, env)
    assert "name: demo" in resolved and "epochs: 3" in resolved and "source: demo" in resolved
    package = Path(where).parent
    assert (package / "embed" / "model_configs" / "raylt-tiny-vit.json").is_file()  # the model configs ship too
    assert not (package.parent / "configs").exists()  # the configs live inside the package, not beside it
