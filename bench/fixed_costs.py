"""Fixed costs of small runs, end to end as a user types the commands: a tiny `raylt fit`, the
demo's `raylt run` (new store, everything reused, store reused with fits trained), and a
misspelt name. The peer, measured in the same run: a bare interpreter importing what a fit
imports (torch, Ray Train, scikit-learn, MLflow), the floor no command of this stack can go
under.

Data: a 20-class Parquet file of 2,350 rows (`raylt.testing.simulate.clip_like`, D = 20),
4 epochs; the demo config as `make demo` runs it (`--baseline`). Each command runs once, in a
folder of its own, with its own MLflow database (the first fit creates it, as a user's first
fit in a folder does), `RAY_AUTH_MODE=disabled`.

    python bench/fixed_costs.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(args: list[str], cwd: Path, expect: int = 0) -> float:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != expect:
        raise SystemExit(f"{' '.join(args)} exited with {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    from raylt.testing.simulate import clip_like, write_parquet

    raylt = [sys.executable, "-m", "raylt"]
    demo = str(ROOT / "configs" / "demo.yaml")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        x, y, s = clip_like(np.array([120] * 4 + [30] * 4 + [3] * 12), 20, splits=("val", "test"))
        write_parquet(x, y, s, tmp / "emb" / "part-0.parquet", [f"kind {i}" for i in range(20)])
        floor = timed([sys.executable, "-c", "import torch, ray.train.torch, sklearn.base, mlflow"], tmp)
        fit = [*raylt, "fit", "--embeddings", "emb", f"tracking.uri=sqlite:///{tmp / 'fit.db'}"]
        run = [*raylt, "run", demo, "--baseline", f"store.root={tmp / 'store'}",
               f"tracking.uri=sqlite:///{tmp / 'demo.db'}"]
        rows = [
            ("a tiny `raylt fit`, first in its folder (MLflow creates its database)", timed([*fit, "--out", "f1"], tmp)),
            ("the same fit again, into a new output folder", timed([*fit, "--out", "f2"], tmp)),
            ("`make demo`'s run: store built, two fits", timed([*run, f"train.output_dir={tmp / 'o1'}"], tmp)),
            ("`make demo`'s run again: everything reused", timed([*run, f"train.output_dir={tmp / 'o1'}"], tmp)),
            ("`make demo`'s run, store reused, two fits trained", timed([*run, f"train.output_dir={tmp / 'o2'}"], tmp)),
            ("`raylt run` with a misspelt head name (an error)",
             timed([*raylt, "run", demo, "head.name=cosin"], tmp, expect=2)),
        ]
    print(f"peer: `python -c 'import torch, ray.train.torch, sklearn.base, mlflow'` {floor:.1f} s\n")
    print("| command | seconds | x the imports alone |")
    print("|---|---|---|")
    for what, seconds in rows:
        print(f"| {what} | {seconds:.1f} | {seconds / floor:.2f} |")


if __name__ == "__main__":
    main()
