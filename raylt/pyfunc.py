"""The logged model: an MLflow pyfunc that predicts class probabilities.

Input of `predict`: embeddings, as a 2-D array or a DataFrame with an `embedding` column of
float lists; or images, as a DataFrame with an `image` column of encoded bytes (PNG, JPEG;
base64 strings when the model is served over HTTP),
which the model decodes and embeds with its backbone when that backbone's weights are
available where it is loaded. Output: a DataFrame of probabilities, one column per class name.

The head is plain numpy (`head.npz`: kind, weight, bias, scale), so predicting from
embeddings needs neither torch nor Ray. raylt's own code travels with the model
(`code_paths`), so `mlflow.pyfunc.load_model` works in a fresh process. It is logged as a
model from code (raylt/pyfunc_model.py), so no pickle is written; loading a model still runs
its code: load models only from runs you trust.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np

try:
    import mlflow.pyfunc
    import pandas as pd

    _Base = mlflow.pyfunc.PythonModel
except ImportError:  # the module must import without mlflow for `head_logits`
    _Base = object


def save_head(state: dict, kind: str, scale: float, path: Path, num_targets: int | None = None,
              adapter: dict | None = None) -> None:
    """The trained head's parameters (a torch state dict) as numpy arrays: its first
    `num_targets` rows (auxiliary-class rows are dropped at inference) and, when features were
    adapted, the adapter's weights (`adapter_w1` ...), applied before the head."""
    w = state["weight"].detach().cpu().numpy().astype(np.float32)
    b = state["bias"].detach().cpu().numpy().astype(np.float32) if "bias" in state else np.zeros(len(w), np.float32)
    n = len(w) if num_targets is None else num_targets
    extra = {f"adapter_{k}": v for k, v in (adapter or {}).items()}
    np.savez(path, kind=np.asarray(kind), weight=w[:n], bias=b[:n], scale=np.float32(scale), **extra)


def load_head(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        adapter = {k[len("adapter_"):]: z[k] for k in z.files if k.startswith("adapter_")}
        return {"kind": str(z["kind"]), "weight": z["weight"], "bias": z["bias"], "scale": float(z["scale"]),
                "adapter": adapter or None}


def adapter_numpy(params: dict, x: np.ndarray) -> np.ndarray:
    """`raylt.adapter.ResidualAdapter.forward` in numpy (tanh GELU): params w1, b1, w2, b2."""
    h = x @ params["w1"].T + params["b1"]
    h = 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    z = x + h @ params["w2"].T + params["b2"]
    return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def head_logits(head: dict, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if head.get("adapter"):
        x = adapter_numpy(head["adapter"], x)
    if head["kind"] == "cosine":
        w = head["weight"] / np.linalg.norm(head["weight"], axis=1, keepdims=True).clip(1e-12)
        return head["scale"] * (x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)) @ w.T
    return x @ head["weight"].T + head["bias"]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class HeadModel(_Base):
    def load_context(self, context) -> None:
        self.head = load_head(context.artifacts["head"])
        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.class_names = meta["class_names"]
        self.backbone = meta.get("backbone")
        self._encoder = None

    def _embed_images(self, images) -> np.ndarray:
        import torch

        from raylt.backbones import build_encoder
        from raylt.config import BackboneConfig
        from raylt.images import decode_image

        if self._encoder is None:
            if not self.backbone:
                raise ValueError("this model was trained on embeddings without a known backbone; pass embeddings")
            self._encoder = build_encoder(BackboneConfig(**self.backbone))
        # Over HTTP (`mlflow models serve`) the bytes arrive base64-encoded in JSON.
        raw = [base64.b64decode(b) if isinstance(b, str) else bytes(b) for b in images]
        pixels = np.stack([decode_image(b, self._encoder.spec) for b in raw])
        return self._encoder.encode(torch.from_numpy(pixels)).numpy()

    # The DataFrame hint is one MLflow takes without a signature (and without warning that
    # hints are missing); arrays still arrive as they are.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            if "image" in model_input.columns:
                x = self._embed_images(model_input["image"].tolist())
            elif "embedding" in model_input.columns:
                x = np.stack([np.asarray(v, dtype=np.float32) for v in model_input["embedding"]])
            else:
                x = model_input.to_numpy(dtype=np.float32)  # one column per dimension
        else:
            x = np.asarray(model_input, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.head["weight"].shape[1]:
            raise ValueError(f"expected embeddings of size {self.head['weight'].shape[1]}, got shape {x.shape}")
        return pd.DataFrame(softmax(head_logits(self.head, x)), columns=self.class_names)


def log_model(head_path: Path, meta_path: Path) -> str:
    """Log the pyfunc model (head weights, and class names and backbone in `meta_path`) into
    the active MLflow run; returns its model URI."""
    import logging

    import mlflow

    import raylt

    # The model takes embeddings (arrays or DataFrames) or encoded images, so it has no single
    # signature; MLflow would warn on every run that it could not infer one.
    quiet = _DropMessage("Failed to infer model signature")
    logging.getLogger("mlflow.pyfunc").addFilter(quiet)
    try:
        info = _log(mlflow, raylt, head_path, meta_path)
    finally:
        logging.getLogger("mlflow.pyfunc").removeFilter(quiet)
    return info.model_uri


class _DropMessage:
    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


def _log(mlflow, raylt, head_path: Path, meta_path: Path):
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"head": str(head_path), "meta": str(meta_path)},
        code_paths=[str(Path(raylt.__file__).parent)],
        # Explicit: inferring them would load the model and import everything it imports.
        pip_requirements=[f"numpy=={np.__version__}", f"pandas=={__import__('pandas').__version__}",
                          f"mlflow=={mlflow.__version__}"],
    )
