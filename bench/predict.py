"""Batch prediction: `raylt predict` (Ray Data, one output file) against the logged MLflow
model's own `predict` in one process, on the same embeddings and head.

Data: N L2-normalised embeddings (D = 512) in Parquet files of 50,000 rows, a linear head of
365 classes (Places-LT size). The peer reads the Parquet files with pandas, calls
`mlflow.pyfunc.load_model(...).predict` on the `embedding` column (the documented way to use
the logged model) and keeps the top 5 with numpy; raylt predict writes the top 5 of every row,
with class names, to one Parquet file. Ray's start-up is timed apart: a cluster pays it once.

    python bench/predict.py                 # 1,000,000 rows
    python bench/predict.py --rows 200000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_inputs(tmp: Path, rows: int, dim: int, classes: int) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from raylt.head.artifact import HeadArtifact

    rng = np.random.default_rng(0)
    emb = tmp / "emb"
    emb.mkdir()
    for i, start in enumerate(range(0, rows, 50_000)):
        n = min(50_000, rows - start)
        x = rng.normal(size=(n, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)
        pq.write_table(pa.table({"embedding": col, "id": pa.array([f"img-{start + j}" for j in range(n)])}),
                       emb / f"part-{i:05d}.parquet")
    model = tmp / "model"
    model.mkdir()
    w = rng.normal(size=(classes, dim)).astype(np.float32)
    HeadArtifact("linear", w, np.zeros(classes, np.float32)).save(model / "head.npz")
    (model / "model_meta.json").write_text(json.dumps({"class_names": [f"class {c}" for c in range(classes)],
                                                       "backbone": None}))
    return emb, model


def peer(emb: Path, model: Path, tmp: Path, k: int) -> float:
    """rows/s of the logged pyfunc model, fed DataFrames read from the Parquet files."""
    import mlflow
    import pandas as pd

    from raylt.serve.pyfunc import log_model

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    with mlflow.start_run():
        uri = log_model(model / "head.npz", model / "model_meta.json")
    loaded = mlflow.pyfunc.load_model(uri)
    t0, rows = time.perf_counter(), 0
    for f in sorted(emb.glob("*.parquet")):
        df = pd.read_parquet(f)
        probs = loaded.predict(df[["embedding"]]).to_numpy()
        top = np.argsort(-probs, axis=1)[:, :k]
        rows += len(top)
    return rows / (time.perf_counter() - t0)


def ours(emb: Path, model: Path, tmp: Path, k: int) -> tuple[float, float]:
    """(rows/s of raylt predict, Ray start-up seconds)."""
    import ray

    from raylt.config import load_config
    from raylt.serve.model import load_model
    from raylt.serve.predict import Request, predict

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - t0
    cfg = load_config(None, [])
    req = Request(load_model(str(model), ""), emb, cfg, {})
    res = predict(req, "embeddings", tmp / "pred.parquet", k)
    ray.shutdown()
    return res.rows / res.seconds, startup


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=365)
    ap.add_argument("--top-k", type=int, default=5)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        emb, model = write_inputs(tmp, args.rows, args.dim, args.classes)
        p = peer(emb, model, tmp, args.top_k)
        r, startup = ours(emb, model, tmp, args.top_k)
    print(f"| method | rows/s | vs peer |\n|---|---|---|\n| mlflow pyfunc predict, one process (peer) | {p:,.0f} | 1.00 |")
    print(f"| raylt predict, Ray Data, {os.cpu_count()} CPUs | {r:,.0f} | {r / p:.2f} |")
    print(f"{args.rows:,} rows, D={args.dim}, {args.classes} classes, top-{args.top_k}; Ray start-up {startup:.1f} s "
          "(not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
