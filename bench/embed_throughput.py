"""Embedding throughput: raylt's Ray Data stage against a plain single-process PyTorch loop.

Both embed the same JPEG files with the same open_clip model. The peer is what a user would
otherwise write: open_clip's own `preprocess` transform on each PIL image, batches through
`model.encode_image` under `torch.inference_mode()` (and bf16 autocast on a GPU). On a GPU
the model-only throughput on pre-decoded tensors is also measured: the ceiling.

    python bench/embed_throughput.py                      # ViT-B-16 (random weights: speed only)
    python bench/embed_throughput.py --model raylt-tiny-vit --images 256

Weights do not change speed, so the model is randomly initialised unless --pretrained is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _make_image(args) -> None:
    folder, i, classes, size, seed = args
    rng = np.random.default_rng((seed, i))
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    c = i % classes
    base = np.stack([np.sin(xx * (c + 1) * 3 + k) for k in range(3)], axis=-1) * 100 + 128
    img = (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
    path = folder / "train" / f"class{c}" / f"{i:05d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=90)


def make_images(folder: Path, n: int, classes: int = 8, size=(500, 375), seed: int = 0) -> None:
    """Photo-sized JPEGs (smooth colour fields with noise), in an ImageFolder layout."""
    from multiprocessing import Pool

    with Pool() as pool:
        pool.map(_make_image, [(folder, i, classes, size, seed) for i in range(n)], chunksize=16)


def plain_loop(paths: list[str], model_name: str, pretrained: str | None, batch: int, device: str) -> float:
    """images/s of the single-process loop, model built outside the timing."""
    import open_clip
    import torch

    from raylt.embed.backbones import register_model_configs

    register_model_configs(None)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    model = model.eval().to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast:
        for s in range(0, len(paths), batch):
            x = torch.stack([preprocess(Image.open(p)) for p in paths[s : s + batch]]).to(device)
            emb = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1).cpu()
    assert emb.shape[0] > 0
    return len(paths) / (time.perf_counter() - t0)


def model_only(model_name: str, n: int, batch: int) -> float:
    """GPU ceiling: encode_image on tensors already on the device, bf16 autocast."""
    import open_clip
    import torch

    model = open_clip.create_model(model_name).eval().cuda()
    size = model.visual.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    x = torch.randn(batch, 3, size, size, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.encode_image(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(max(1, n // batch)):
            model.encode_image(x)
        torch.cuda.synchronize()
    return max(1, n // batch) * batch / (time.perf_counter() - t0)


def _decode_chunk(args) -> int:
    from raylt.embed.images import DecodeSpec, decode_image

    paths, size = args
    spec = DecodeSpec(size, "shortest", "bicubic")
    for p in paths:
        decode_image(p, spec)
    return len(paths)


def decode_only(paths: list[str], size: int = 224) -> float:
    """images/s of JPEG decode + resize alone, one process per CPU: the CPU-side ceiling."""
    from multiprocessing import Pool

    chunks = [(paths[i : i + 64], size) for i in range(0, len(paths), 64)]
    with Pool() as pool:
        pool.map(_decode_chunk, chunks[: os.cpu_count()])  # warm the processes
        t0 = time.perf_counter()
        n = sum(pool.map(_decode_chunk, chunks))
    return n / (time.perf_counter() - t0)


def ray_stage(folder: Path, store: Path, model_name: str, pretrained: str | None, batch: int, extra: list[str]):
    from raylt.config import load_config
    from raylt.embed.stage import run_embed

    overrides = [
        "data.source=folder", f"data.root={folder}", f"store.root={store}", "backbone.name=open_clip",
        f"backbone.model={model_name}", f"embed.batch_size={batch}", *extra,
    ]
    if pretrained:
        overrides.append(f"backbone.pretrained={pretrained}")
    t0 = time.perf_counter()
    res = run_embed(load_config(None, overrides))
    return res, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--plain-images", type=int, default=1024, help="images for the (slow) plain loop; a rate, so a subset")
    ap.add_argument("--folder", type=Path, help="embed these images instead of generated ones (ImageFolder layout)")
    ap.add_argument("overrides", nargs="*", help="extra raylt config overrides for the Ray stage")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "images"
        if args.folder is None:
            make_images(folder, args.images)
        paths = sorted(str(p) for p in folder.rglob("*.jpg"))
        res, total = ray_stage(folder, Path(tmp) / "store", args.model, args.pretrained, args.batch, args.overrides)
        decode = decode_only(paths)
        plain = plain_loop(paths[: args.plain_images], args.model, args.pretrained, args.batch, device)
        ceiling = model_only(args.model, max(len(paths), 8192), args.batch) if device == "cuda" else None

    import ray

    cpus, gpus = int(ray.cluster_resources().get("CPU", 0)), int(ray.cluster_resources().get("GPU", 0))
    print(f"\nembedding throughput, {args.model}, {len(paths)} JPEGs 500x375, batch {args.batch}, "
          f"{cpus} CPUs, {gpus} GPUs ({torch.cuda.get_device_name() if gpus else 'CPU only'})")
    print(f"  raylt Ray Data stage     {res.images_per_s:8.1f} images/s  (pipeline; {len(paths) / total:.1f} with Ray start-up)")
    print(f"    after the first batch  {res.steady_images_per_s:8.1f} images/s  (first batch after {res.warmup_s:.1f} s)")
    print(f"  decode only, {os.cpu_count()} procs {decode:8.1f} images/s  (CPU ceiling of the pipeline)")
    print(f"  plain PyTorch loop       {plain:8.1f} images/s")
    print(f"  ratio raylt / plain      {res.images_per_s / plain:8.2f}")
    if ceiling:
        print(f"  model only (ceiling)     {ceiling:8.1f} images/s")
        print(f"  ratio raylt / ceiling    {res.images_per_s / ceiling:8.2f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
