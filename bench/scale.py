"""An iNaturalist-2018-sized latent run on this machine: time and peak memory of `raylt fit`.

Data: CLIP-like embeddings (raylt.testing.simulate) with a long tail the size of iNaturalist 2018's
train split (`inat_like_profile`: 8,142 classes, 437,513 images, 1,000 down to 2) and 3
held-out images per class (iNaturalist's val split has 3), written as Parquet shards. The
run is the real command, `python -m raylt fit --embeddings ...` (the default recipe, or `--epochs E`), in its own
process on a fresh local Ray: class statistics (Ray reduce), calibration, the Ray Train head
with synthetic top-up, evaluation, MLflow logging. Peak memory is the machine's (MemTotal -
MemAvailable, sampled every 0.2 s, the idle level before the run subtracted), so Ray's worker
processes and shared-memory object store count. Data generation is not timed.

    python bench/scale.py                                   # 8,142 classes, D = 768, the default recipe
    python bench/scale.py --grid                            # classes 2,036 / 4,071 / 8,142 at D = 768, D 256 / 512 at 2,036
    python bench/scale.py --classes 2036 --dim 512 --epochs 30
    python bench/scale.py --text scenes                     # with class names (--class-text): text prior, ensemble

With `--text` the generator's class-name view (raylt.testing.simulate.TEXT_SETTINGS) is written
beside the shards as a Parquet file of (label, embedding) rows and passed as `--class-text`.
The held-out rows are the only evaluation split, so the offsets, the temperature and the
ensemble's weight are chosen on a holdout of the train split (`head.holdout`), and the head is
fitted again on all of it: `holdout_s` is that first fit.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raylt.testing.simulate import TEXT_SETTINGS, LatentSpec, generate, inat_like_profile  # noqa: E402

GRID = [(2036, 768), (4071, 768), (8142, 768), (2036, 256), (2036, 512)]


def meminfo() -> dict[str, int]:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return {k: int(v.split()[0]) * 1024 for k, v in info.items() if v.strip().endswith("kB")}


def used_bytes() -> int:
    info = meminfo()
    return info["MemTotal"] - info["MemAvailable"]


def biggest_processes(n: int = 4) -> list[tuple[str, int]]:
    """(name, private resident bytes) of the n largest processes: Ray names its workers
    `ray::<Class or task>`, which says what each one is doing."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
            private = int(status.get("RssAnon", "0 kB").split()[0]) * 1024
            name = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, ValueError):
            continue
        out.append((name.rsplit("/", 1)[-1][:40], private))
    return sorted(out, key=lambda t: -t[1])[:n]


def write_shards(classes: int, dim: int, folder: Path, text: str | None = None,
                 rows_per_shard: int = 65_536) -> tuple[int, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylt.embed.store import embedding_table

    counts = inat_like_profile(classes)
    (x, y, s), _, *names = generate("clip_like", counts, 3, LatentSpec(dim=dim), text=text)
    folder.mkdir(parents=True)
    if names:  # beside the shards, not among them: the embeddings reader takes every .parquet below
        pq.write_table(pa.table({"label": np.arange(classes), "embedding": list(names[0].astype(np.float32))}),
                       folder.parent / "class_text.parquet")
    order = np.random.default_rng(0).permutation(len(y))  # shards mix classes, as a store's do
    for i, lo in enumerate(range(0, len(y), rows_per_shard)):
        idx = order[lo : lo + rows_per_shard]
        pq.write_table(embedding_table(x[idx], y[idx], s[idx], [f"sim/{j}" for j in idx]),
                       folder / f"part-{i:05d}.parquet")
    return int(counts.sum()), int((s != "train").sum())


def run_fit(data: Path, out: Path, epochs: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "raylt", "-q", "fit", "--embeddings", str(data), "--out", str(out),
           f"train.epochs={epochs}", f"tracking.uri=sqlite:///{out.parent / 'mlflow.db'}", *extra]
    idle, peak, done, at_peak = used_bytes(), [0], threading.Event(), {}

    def watch():
        while not done.is_set():
            used = used_bytes()
            if used > peak[0]:
                peak[0] = used
                at_peak.update(shared=meminfo()["Shmem"], processes=biggest_processes(),
                               seconds=time.perf_counter() - t0)
            time.sleep(0.2)

    t0 = time.perf_counter()
    threading.Thread(target=watch, daemon=True).start()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    wall = time.perf_counter() - t0
    done.set()
    if proc.returncode:
        raise SystemExit(f"raylt fit failed:\n{proc.stderr[-4000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": wall, "peak_gb": (peak[0] - idle) / 1e9, "metrics": metrics, "at_peak": at_peak}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=8142)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--epochs", type=int, help="head epochs (default: the config's, train.epochs)")
    ap.add_argument("--grid", action="store_true", help="the five sizes of docs/BENCHMARKS.md")
    ap.add_argument("--work", type=Path, default=Path("/tmp/raylt-scale"))
    ap.add_argument("--keep", action="store_true", help="keep the generated embeddings and outputs")
    ap.add_argument("--text", choices=list(TEXT_SETTINGS), help="class names' text view (default: none)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    sizes = GRID if args.grid else [(args.classes, args.dim)]
    if args.epochs is None:
        from raylt.config import load_config

        args.epochs = load_config(None, args.overrides).train.epochs
    print("| classes | D | train rows | eval rows | epochs | stats s | holdout s | train s | wall s | peak memory GB "
          "| top-1 | zero-shot top-1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for classes, dim in sizes:
        work = args.work / f"c{classes}-d{dim}"
        shutil.rmtree(work, ignore_errors=True)
        # Generated in a child process, so that none of its memory is held during the run.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            n_train, n_eval = pool.apply(write_shards, (classes, dim, work / "embeddings", args.text))
        text = ["--class-text", str(work / "class_text.parquet")] if args.text else []
        r = run_fit(work / "embeddings", work / "out", args.epochs, [*text, *args.overrides])
        sec = r["metrics"]["seconds"]
        zs = r["metrics"].get("zero_shot", {}).get("overall")
        print(f"| {classes:,} | {dim} | {n_train:,} | {n_eval:,} | {args.epochs} | {sec['stats_s']:.1f} | "
              f"{sec.get('holdout_s', 0):.1f} | {sec['train_s']:.1f} | {r['wall_s']:.1f} | {r['peak_gb']:.2f} | "
              f"{r['metrics']['overall']:.4f} | {'-' if zs is None else f'{zs:.4f}'} |", flush=True)
        peak = r["at_peak"]
        top = ", ".join(f"{name} {b / 1e9:.2f}" for name, b in peak["processes"])
        print(f"  at the peak ({peak['seconds']:.0f} s in): shared memory {peak['shared'] / 1e9:.2f} GB; "
              f"largest private: {top} GB", file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
