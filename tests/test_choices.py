"""Every config-named registry: unknown names fail before any work."""

import os
from pathlib import Path

import numpy as np
import pytest

from raylt.config import load_config
from raylt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, match", [
    ("selection.name=dpp", "unknown selector 'dpp'"),
    ("adapter.name=bnss", "did you mean 'bns'"),
    ("auxiliary.match=names", "unknown auxiliary matcher 'names'"),
    ("adapter.batches=uniform", "unknown adapter batch sampler 'uniform'"),
])
def test_unknown_method_names_fail_before_any_work(override, match):
    from raylt.choices import check_names

    with pytest.raises(ConfigError, match=match):
        check_names(load_config(None, [override]))


@pytest.mark.parametrize("title, key, registry", __import__("raylt.choices").choices.LISTED,
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_declared_name_is_what_its_home_module_registers(title, key, registry):
    import importlib

    importlib.import_module(registry.home)
    assert set(registry.names()) == registry.declared  # nothing registered there without its declaration
    for name in registry.names():
        registry.get(name)  # each declared name resolves to its object


def test_a_mistake_on_the_command_line_fails_before_torch_or_ray_is_imported(tmp_path):
    """Misspelt names, a folder holding another config's checkpoints and a wrong model: each
    a one-line error from a process that never imported torch or Ray (they take seconds)."""
    import json
    import subprocess
    import sys

    from raylt.testing.simulate import clip_like, write_parquet

    x, y, s = clip_like(np.array([20, 5]), 8, splits=("test",))
    write_parquet(x, y, s, tmp_path / "emb" / "part-0.parquet", ["a", "b"])
    other = tmp_path / "other" / "train" / "checkpoint_local_000001"  # another config's checkpoint
    other.mkdir(parents=True)
    (other / "state.pt").write_bytes(b"")
    (other / "key").write_text("0123456789abcdef\n")
    demo, emb = str(REPO / "configs" / "demo.yaml"), str(tmp_path / "emb")
    cases = [
        (["run", demo, "head.name=cosin", f"train.output_dir={tmp_path}"], "unknown head 'cosin' (did you mean 'cosine'?)"),
        (["fit", "--embeddings", emb, "--out", str(tmp_path / "o"), "head.loss=focal"], "unknown loss 'focal'"),
        (["fit", "--embeddings", emb, "--out", str(tmp_path / "other")], "holds checkpoints of a different config"),
        (["run", demo, "--out", str(tmp_path / "other")], "holds checkpoints of a different config"),
        (["embed", demo, "backbone.name=clip"], "unknown backbone 'clip'"),
        (["tune", demo, "sampler.name=gaus"], "unknown sampler 'gaus'"),
        (["ablate", demo, "selection.name=dpp"], "unknown selector 'dpp'"),
        (["predict", str(tmp_path / "nope"), emb, "--out", str(tmp_path / "p.parquet")], "cannot load model"),
    ]
    script = (
        "import contextlib, io, json, sys\n"
        "from raylt.cli import main\n"
        "out = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = main(args)\n"
        "    out.append([code, err.getvalue().strip().splitlines()[-1]])\n"
        "print(json.dumps({'results': out, 'loaded': [m for m in ('torch', 'ray') if m in sys.modules]}))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps([c[0] for c in cases])], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for (args, message), (code, line) in zip(cases, got["results"]):
        assert code == 2 and line.startswith("raylt: error: ") and message in line, (args, line)
    assert got["loaded"] == []
