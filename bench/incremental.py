"""Adding images to a corpus: `run_embed` after 2% new images, against the full run before it.

The data set's fingerprint changes with the new images, so a new store is made; the image
cache (raylt/embed/cache.py) supplies every image it has seen, and only the new ones go
through the encoder. The peer is the full run of the same corpus in the same process, on the
same Ray; both include Ray Data's start-up, Ray's own start is excluded (Ray is up first).

    python bench/incremental.py                        # 20,000 images, 2% added, raylt-tiny-vit
    python bench/incremental.py --images 2000 --model ViT-B-16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from embed_throughput import _make_image  # noqa: E402


def make(folder: Path, lo: int, hi: int, size) -> None:
    with Pool() as pool:
        pool.map(_make_image, [(folder, i, 8, size, 0) for i in range(lo, hi)], chunksize=64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--added", type=float, default=0.02, help="fraction of new images")
    ap.add_argument("--model", default="raylt-tiny-vit")
    ap.add_argument("--size", type=int, nargs=2, default=(160, 120), help="generated JPEG width and height")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("raylt").setLevel(logging.INFO)
    import ray

    from raylt.config import load_config
    from raylt.embed.stage import run_embed

    ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        folder, store = Path(tmp) / "images", Path(tmp) / "store"
        added = round(args.images * args.added)
        make(folder, 0, args.images, tuple(args.size))
        cfg = lambda: load_config(None, ["data.source=folder", f"data.root={folder}", f"store.root={store}",  # noqa: E731
                                         "backbone.name=open_clip", f"backbone.model={args.model}",
                                         "backbone.offline=true"])
        t0 = time.perf_counter()
        full = run_embed(cfg())
        t_full = time.perf_counter() - t0
        make(folder, args.images, args.images + added, tuple(args.size))
        t0 = time.perf_counter()
        grown = run_embed(cfg())
        t_grown = time.perf_counter() - t0
    print(f"\n{args.images:,} generated {args.size[0]}x{args.size[1]} JPEGs, {args.model}, "
          f"{os.cpu_count()} CPUs; then {added:,} more ({args.added:.0%})\n")
    print("| run | images in the data set | encoded | from the image cache | seconds |")
    print("|---|---|---|---|---|")
    print(f"| full (peer) | {full.computed_rows:,} | {full.encoded_rows:,} | "
          f"{full.computed_rows - full.encoded_rows:,} | {t_full:.1f} |")
    print(f"| after adding {args.added:.0%} | {grown.computed_rows:,} | {grown.encoded_rows:,} | "
          f"{grown.computed_rows - grown.encoded_rows:,} | {t_grown:.1f} |")
    print(f"\nratio to the full run: {t_grown / t_full:.3f}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
