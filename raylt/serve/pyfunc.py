"""The logged model: an MLflow pyfunc that predicts class probabilities.

Input of `predict`: embeddings, as a 2-D array or a DataFrame with an `embedding` column of
float lists; or images, as a DataFrame with an `image` column of encoded bytes (PNG, JPEG;
base64 strings when the model is served over HTTP),
which the model decodes and embeds with its backbone when that backbone's weights are
available where it is loaded. Output: a DataFrame of probabilities, one column per class name.

The head is plain numpy (`head.npz`, raylt.head.artifact), so predicting from embeddings
needs neither torch nor Ray. raylt's own code travels with the model (`code_paths`), so
`mlflow.pyfunc.load_model` works in a fresh process. It is logged as a model from code
(raylt/serve/pyfunc_model.py), so no pickle is written; loading a model still runs its code:
load models only from runs you trust. Models logged before raylt's stage packages name
`raylt.pyfunc.HeadModel`, which `raylt/pyfunc.py` still provides.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd

import raylt
from raylt.head.artifact import head_logits, load_head, softmax
from raylt.tracking.outputs import read_model_meta


class HeadModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.head = load_head(context.artifacts["head"])
        meta = read_model_meta(Path(context.artifacts["meta"]))
        self.class_names = meta["class_names"]
        self.backbone = meta.get("backbone")
        self._encoder = None
        self._building = threading.Lock()

    def _embed_images(self, images) -> np.ndarray:
        # torch and the encoders only for image input: a model that scores embeddings needs neither.
        import torch

        from raylt.config import BackboneConfig
        from raylt.embed.backbones import build_encoder
        from raylt.embed.images import ImageError, decode_image

        if not self.backbone:
            raise bad_request("this model was trained on embeddings without a known backbone; send embeddings")
        with self._building:  # the server's threads: the first requests must not build it each
            if self._encoder is None:
                self._encoder = build_encoder(BackboneConfig(**self.backbone))
        pixels = []
        for i, b in enumerate(images):
            try:
                # Over HTTP (`mlflow models serve`) the bytes arrive base64-encoded in JSON.
                data = base64.b64decode(b, validate=True) if isinstance(b, str) else bytes(b)
                pixels.append(decode_image(data, self._encoder.spec))
            except binascii.Error:  # a ValueError: first
                raise bad_request(f"the image in row {i} is not valid base64 (cut short, or not encoded)") from None
            except ImageError as e:
                raise bad_request(f"the image in row {i}: {e}") from None
            except (ValueError, TypeError):
                raise bad_request(f"the image in row {i} is not encoded image bytes ({type(b).__name__})") from None
        return self._encoder.encode(torch.from_numpy(np.stack(pixels))).numpy()

    # The DataFrame hint is one MLflow takes without a signature (and without warning that
    # hints are missing); arrays still arrive as they are.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Probabilities [rows, classes]. A request it cannot score is refused whole, with an
        MlflowException of INVALID_PARAMETER_VALUE (HTTP 400 from `mlflow models serve`) whose
        message names the row and what is wrong, never a traceback."""
        if len(model_input) == 0:
            raise bad_request("the request holds no rows; send at least one embedding or image")
        try:
            if isinstance(model_input, pd.DataFrame):
                if "image" in model_input.columns:
                    x = self._embed_images(model_input["image"].tolist())
                elif "embedding" in model_input.columns:
                    x = np.stack([np.asarray(v, dtype=np.float32) for v in model_input["embedding"]])
                else:
                    x = model_input.to_numpy(dtype=np.float32)  # one column per dimension
            else:
                x = np.asarray(model_input, dtype=np.float32)
        except (ValueError, TypeError) as e:
            raise bad_request(f"the embeddings are not numbers of one length ({str(e).splitlines()[0][:120]}); "
                              f"send {self.head.dim} floats per row") from None
        if x.ndim != 2 or x.shape[1] != self.head.dim:
            raise bad_request(f"expected embeddings of size {self.head.dim}, got shape {x.shape}")
        broken = ~np.isfinite(x).all(1)
        if broken.any():
            raise bad_request(f"the embedding in row {int(np.flatnonzero(broken)[0])} holds NaN or infinite values "
                              f"({int(broken.sum())} row(s))")
        return pd.DataFrame(softmax(head_logits(self.head, x)), columns=self.class_names)


def bad_request(message: str) -> mlflow.exceptions.MlflowException:
    """A refused request: MLflow's scoring server answers it with HTTP 400 and this message,
    without the traceback it attaches to any other exception."""
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return mlflow.exceptions.MlflowException(f"raylt: {message}", error_code=INVALID_PARAMETER_VALUE)


def log_model(head_path: Path, meta_path: Path) -> str:
    """Log the pyfunc model (head weights, and class names and backbone in `meta_path`) into
    the active MLflow run; returns its model URI."""
    # The model takes embeddings (arrays or DataFrames) or encoded images, so it has no single
    # signature; MLflow would warn on every run that it could not infer one.
    quiet = _DropMessage("Failed to infer model signature")
    logging.getLogger("mlflow.pyfunc").addFilter(quiet)
    try:
        info = _log(head_path, meta_path)
    finally:
        logging.getLogger("mlflow.pyfunc").removeFilter(quiet)
    return info.model_uri


class _DropMessage:
    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


def _log(head_path: Path, meta_path: Path):
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(__file__).with_name("pyfunc_model.py")),
        artifacts={"head": str(head_path), "meta": str(meta_path)},
        code_paths=[str(Path(raylt.__file__).parent)],
        # Explicit: inferring them would load the model and import everything it imports.
        pip_requirements=[f"numpy=={np.__version__}", f"pandas=={pd.__version__}",
                          f"mlflow=={mlflow.__version__}"],
    )
