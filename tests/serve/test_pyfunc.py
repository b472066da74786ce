"""The logged model: models saved before raylt's stage packages still load and predict."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from raylt.head.artifact import head_logits, load_head, softmax
from raylt.serve.model import load_model

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "model-0.1.0"


def test_a_model_saved_by_the_flat_layout_loads_and_predicts(tmp_path):
    """The fixture was saved by raylt 0.1.0 (`mlflow.pyfunc.save_model` with its
    `raylt/pyfunc_model.py`, without the copy of raylt's code): its entry point imports
    `raylt.pyfunc.HeadModel`, as every model logged before the move does."""
    import mlflow.pyfunc

    assert "from raylt.pyfunc import HeadModel" in (FIXTURE / "pyfunc_model.py").read_text()
    model_dir = tmp_path / "model"
    shutil.copytree(FIXTURE, model_dir)
    model = load_model(str(model_dir), f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert model.class_names == ("cat", "dog", "owl") and model.dim == 4
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    expected = softmax(head_logits(load_head(FIXTURE / "artifacts" / "head.npz"), x))
    probs = mlflow.pyfunc.load_model(str(model_dir)).predict(pd.DataFrame({"embedding": list(x)}))
    assert list(probs.columns) == ["cat", "dog", "owl"]
    np.testing.assert_allclose(probs.to_numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(softmax(head_logits(model.head, x)), expected, rtol=1e-6)
