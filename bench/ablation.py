"""The ablation on the Places-LT-shaped latent benchmark: every method, one MLflow parent run.

Data: CLIP-like embeddings (raylt.testing.simulate) with the real Places-LT train profile (365 classes,
62,500 images, from ../shared/datasets/places_lt when present), D = 512, 100 balanced test
images per class, and an auxiliary corpus of 365 look-alike classes (one per target class,
from the same super-class, `--aux-per-class` images each) for category extrapolation. The
auxiliary names are synthetic, so neighbours are matched by class-mean embeddings
(`auxiliary.match=mean`). Everything then runs through `raylt ablate` (raylt.experiments.ablation): Ray
tasks, Ray Train fits, MLflow child runs.

    python bench/ablation.py                       # full size, results in docs/RESULTS.md
    python bench/ablation.py --scale 0.1 --epochs 5  # a quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from head_fit import places_counts  # noqa: E402

from raylt.config import load_config  # noqa: E402
from raylt.testing.simulate import LatentSpec, with_look_alikes, write_parquet  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/raylt-ablation"), help="data, outputs and mlflow.db")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the train images per class (min 1)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--aux-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--parallel", type=int, default=0)
    ap.add_argument("--recipes", help="comma-separated subset (default: all)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from raylt.experiments.ablation import ablate, markdown
    from raylt.embed.inputs import open_embeddings

    counts = np.maximum(np.round(places_counts() * args.scale), 1).astype(np.int64)
    data = args.work / "data"
    if not (data / "aux" / "part-0.parquet").is_file():
        t0 = time.perf_counter()
        (tx, ty, ts), (ax, ay, as_) = with_look_alikes(counts, args.aux_per_class, 100, LatentSpec(dim=args.dim))
        write_parquet(tx, ty, ts, data / "target" / "part-0.parquet", [f"place_{i}" for i in range(len(counts))])
        write_parquet(ax, ay, as_, data / "aux" / "part-0.parquet", [f"neighbour_{i}" for i in range(len(counts))])
        print(f"data: {len(ty)} target and {len(ay)} auxiliary embeddings in {time.perf_counter() - t0:.0f} s")
    cfg = load_config(ROOT / "configs" / "ablation.yaml", [
        f"auxiliary.embeddings={data / 'aux'}", f"auxiliary.class_names={data / 'aux' / 'classnames.txt'}",
        f"train.epochs={args.epochs}", f"tracking.uri=sqlite:///{args.work / 'mlflow.db'}", *args.overrides,
    ])
    es = open_embeddings(data / "target", str(data / "target" / "classnames.txt"))
    print(f"\nablation: {es.num_classes} classes, {int(es.train_counts.sum())} train embeddings "
          f"({es.train_counts.max()} down to {es.train_counts.min()}), D={es.dim}\n")
    t0 = time.perf_counter()
    names = args.recipes.split(",") if args.recipes else None
    rows = ablate(cfg, es, args.work / "out", names, args.parallel)
    print(markdown(rows))
    print(f"\n{len(rows)} recipes in {time.perf_counter() - t0:.0f} s; report in {args.work / 'out'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
