"""The one loader of a trained raylt model: an MLflow model URI (`runs:/<run id>/model`,
`models:/<name>/<version>`, `models:/<name>/latest`) or a fit's output folder (`head.npz`,
`model_meta.json`), for runs without tracking.

Output: `Model`: the numpy head (raylt.head.artifact), the class names and the backbone config
it was trained on. `raylt predict` scores with it; the logged pyfunc is one way to reach it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pyfunc

from raylt.errors import RayltError
from raylt.head.artifact import load_head
from raylt.serve.pyfunc import HeadModel
from raylt.tracking import reason, redact
from raylt.tracking.outputs import read_model_meta


@dataclass(frozen=True)
class Model:
    head: dict
    class_names: tuple[str, ...]
    backbone: dict | None  # the backbone config it was trained on; None: trained from embeddings
    uri: str

    @property
    def dim(self) -> int:
        return int(self.head.dim)


def load_model(uri: str, tracking_uri: str) -> Model:
    """The head, class names and backbone of a logged raylt model or a fit's output folder."""
    folder = Path(uri).expanduser()
    if folder.is_dir() and (folder / "head.npz").is_file():
        meta = read_model_meta(folder)
        return Model(load_head(folder / "head.npz"), tuple(meta["class_names"]), meta.get("backbone"),
                     str(folder.resolve()))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file of the model's code
    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    except Exception as e:
        raise RayltError(
            f"cannot load model {uri} from {redact(tracking_uri)} ({reason(e)}); give runs:/<run id>/model, "
            "models:/<name>/<version> or a fit's output folder, logged to this tracking URI (--tracking-uri)"
        ) from None
    if not isinstance(model, HeadModel):
        raise RayltError(f"model {uri} is a {type(model).__name__}, not a raylt head; give a model `raylt run` logged")
    return Model(model.head, tuple(model.class_names), model.backbone, uri)
