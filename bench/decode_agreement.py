"""Decoding in the encoder actor against the CPU tasks' decode: how close the embeddings are.

The same generated photo-sized JPEGs (bench/embed_throughput.py's) go through
`raylt.embed.images.decode_image` (Pillow, draft mode: the CPU path) and through
`raylt.embed.device_decode.decode_on_device` on a device (nvJPEG on a GPU, libjpeg-turbo on the
CPU), then through the same open_clip model. Prints the cosine of each pair's embeddings (min
and mean) and the mean absolute pixel difference; the bar is a cosine of 0.999.

    python bench/decode_agreement.py                        # ViT-B-16, the GPU when there is one
    python bench/decode_agreement.py --device cpu --model raylt-tiny-vit
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from embed_throughput import make_images  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = ap.parse_args(argv)
    import torch

    from raylt.config import load_config
    from raylt.embed.backbones import build_encoder
    from raylt.embed.device_decode import decode_on_device
    from raylt.embed.images import decode_image

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    enc = build_encoder(load_config(None, ["backbone.name=open_clip", f"backbone.model={args.model}",
                                           "backbone.offline=true"]).backbone).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        make_images(Path(tmp), args.images)
        data = [p.read_bytes() for p in sorted(Path(tmp).rglob("*.jpg"))]
    cos, diff = [], []
    for s in range(0, len(data), 64):
        chunk = data[s : s + 64]
        pixels, ok, errors = decode_on_device(chunk, enc.spec, device)
        if not ok.all():
            print("not decoded:", [e for e in errors if e][:3])
            return 1
        ref = torch.from_numpy(np.stack([decode_image(d, enc.spec) for d in chunk]))
        diff.append((pixels.cpu().float() - ref.float()).abs().mean().item())
        cos.append((enc.encode(pixels) * enc.encode(ref)).sum(1).float().cpu().numpy())
    cos = np.concatenate(cos)
    print(f"\n{len(data)} JPEGs 500x375, {args.model}, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}")
    print(f"  cosine, actor decode vs CPU tasks: min {cos.min():.5f}, mean {cos.mean():.5f}  (bar: 0.999)")
    print(f"  mean absolute pixel difference: {np.mean(diff):.3f} of 255")
    return 0 if cos.min() >= 0.999 else 1


if __name__ == "__main__":
    sys.exit(main())
