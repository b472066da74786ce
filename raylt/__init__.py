"""raylt: long-tail image classification on frozen CLIP embeddings, with Ray and MLflow.

The packages, in pipeline order (raylt/pipeline.py calls them in this order):

    data/         sources of {id, label, split, path or image}
    embed/        decode, frozen encoder, the embedding store, embedding sets
    latent/       per-class statistics, calibrated Gaussians, the synthetic stream
    methods/      selection, the BNS adapter, auxiliary classes, which are on
    head/         LongTailHead (the recipe), modules and losses, its rows, the loop, Ray Train, head.npz, evaluation
    tracking/     MLflow runs and the output folder's record
    serve/        the logged model, batch prediction
    experiments/  ablation, tune, report
    config/ ops/  the config schema and loader; Ray, trainer harness, locks, hashes
    testing/      generated embeddings for tests and benchmarks
"""

import os as _os

__version__ = "0.1.0"

# No telemetry unless the user turns it on: MLflow's opens an outside HTTPS connection per run
# (users on closed networks wait for it), and Ray reports usage statistics likewise. Set before
# either is imported; a value the user set wins.
_os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# The library's front door, imported on first use so that `raylt --help` pays for no torch:
#     from raylt import LongTailHead
#     head = LongTailHead().fit(X_train, y_train, X_val, y_val)
#     probabilities = head.predict_proba(X)
_LAZY = {"LongTailHead": "raylt.head.estimator", "HeadArtifact": "raylt.head.artifact",
         "load_head": "raylt.head.artifact"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raylt' has no attribute {name!r}")
