"""Serving under load: `mlflow models serve` of a logged raylt model on loopback, under N
concurrent closed-loop clients (raylt.serve.load), for embeddings in batches of 1 and 64 and
for base64 images (which the model decodes and embeds with its backbone).

The model: the demo (`configs/demo.yaml`) fitted on the tiny open_clip model (random weights:
speed, not accuracy; D = 192), logged to a throw-away MLflow database. One server worker
(`--workers 1`), as a single-core container would run it; the clients share the machine.

    python bench/serve_load.py                     # 8 clients, 60 s per payload
    python bench/serve_load.py --clients 4 --seconds 10
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raylt.serve.load import load  # noqa: E402

TINY = ["backbone.name=open_clip", "backbone.model=raylt-tiny-vit", "backbone.pretrained=null", "backbone.offline=true"]


def fit_demo(tmp: Path) -> str:
    """The demo fitted on the tiny model; its model URI."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "raylt", "run", str(ROOT / "configs/demo.yaml"), *TINY, "train.epochs=2",
           f"store.root={tmp / 'store'}", f"train.output_dir={tmp / 'out'}", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    if proc.returncode:
        raise SystemExit(f"raylt run failed:\n{proc.stderr[-3000:]}")
    run = json.loads((tmp / "out" / "demo" / "run.json").read_text())
    return f"runs:/{run['run_id']}/model"


def photo(seed: int, size=(320, 240)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()


def serve(model_uri: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                             "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=open(tmp / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    import requests

    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if requests.get(f"{url}/ping", timeout=1).ok:
                return proc, url
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"mlflow models serve did not start:\n{(tmp / 'serve.log').read_text()[-3000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--keep-log", action="store_true", help="keep the work folder (the server's log) and print it")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="raylt-serve-") as d:
        tmp = Path(d)
        if args.keep_log:
            tmp = Path(tempfile.mkdtemp(prefix="raylt-serve-log-"))
        uri = fit_demo(tmp)
        proc, url = serve(uri, tmp)
        try:
            from raylt.head.artifact import load_head

            dim = load_head(tmp / "out" / "demo" / "head.npz").dim
            rng = np.random.default_rng(0)
            emb = lambda n: rng.normal(size=(n, dim)).astype(np.float32).tolist()  # noqa: E731
            payloads = {
                "embeddings, batch of 1": {"columns": ["embedding"], "data": [[v] for v in emb(1)]},
                "embeddings, batch of 64": {"columns": ["embedding"], "data": [[v] for v in emb(64)]},
                "JPEG 320 x 240 as base64, batch of 1": {"columns": ["image"], "data": [[photo(0)]]},
                "JPEG 320 x 240 as base64, batch of 8": {"columns": ["image"], "data": [[photo(k)] for k in range(8)]},
            }
            print(f"`mlflow models serve` (1 worker) of {uri}, {args.clients} clients, {args.seconds:g} s each; "
                  f"{os.cpu_count()} cores shared by the server and the clients\n")
            print("| payload | first request ms | requests | failed | requests/s | rows/s | p50 ms | p99 ms |")
            print("|---|---|---|---|---|---|---|---|")
            for name, split in payloads.items():
                body = json.dumps({"dataframe_split": split}).encode()
                # The first request alone: the first image request builds the backbone.
                first = load(f"{url}/invocations", body, clients=1, seconds=600, per_client=1)
                s = load(f"{url}/invocations", body, clients=args.clients, seconds=args.seconds)
                rows = len(split["data"])
                print(f"| {name} | {first.p50_ms:.0f} | {s.requests} | {s.failed + first.failed} | {s.rps:.1f} | "
                      f"{s.rps * rows:.0f} | {s.p50_ms:.1f} | {s.p99_ms:.1f} |", flush=True)
                if s.failed:
                    print(f"  first failure: {s.first_failure}")
        finally:
            os.killpg(proc.pid, 9)
            proc.wait()
            if args.keep_log:
                print(f"server log: {tmp / 'serve.log'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
