"""Image decoding for the embedding stage (CPU side): files or bytes -> uint8 [B, S, S, 3].

Resizing and cropping happen here, on CPU tasks, so the encoder actors receive small uint8
arrays and only normalise and run the model. An unreadable image is not an exception: its
row comes out with `ok = False` and the reason in `error`, to be counted and reported.

Input columns: `row`, `id`, `label`, `split`, and `path` or `image`.
Output columns: `row`, `id`, `label`, `split`, `pixels` [S, S, 3] uint8, `ok`, `error`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFile

# Pillow refuses images above 2 * MAX_IMAGE_PIXELS (a decompression bomb); 89 MP is its default
# and far above any photo data set, so the guard stays on and such a file is a counted skip.
Image.MAX_IMAGE_PIXELS = 89_478_485
ImageFile.LOAD_TRUNCATED_IMAGES = False

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class DecodeSpec:
    """How an image becomes the encoder's input square (mirrors open_clip's PreprocessCfg)."""

    size: int
    resize_mode: Literal["shortest", "squash"] = "shortest"  # shortest side + centre crop, or stretch
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; 16-bit and float greyscale are rescaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        img = Image.fromarray((a.clip(0, hi) * (255.0 / hi)).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode_image(src: str | bytes, spec: DecodeSpec) -> np.ndarray:
    """Open, convert and resize one image to uint8 [S, S, 3]. Raises on any unreadable input."""
    with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as img:
        # JPEG draft mode decodes at a reduced scale that is still >= the target size: the
        # biggest single speed-up for large photos, and the bicubic resize below follows it.
        img.draft("RGB", (spec.size, spec.size))
        img = to_rgb(img)
        img.load()
    s = spec.size
    if spec.resize_mode == "squash":
        img = img.resize((s, s), _RESAMPLE[spec.interpolation])
    else:
        w, h = img.size
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        img = img.resize((nw, nh), _RESAMPLE[spec.interpolation])
        left, top = (nw - s) // 2, (nh - s) // 2
        img = img.crop((left, top, left + s, top + s))
    return np.asarray(img, dtype=np.uint8)


def decode_batch(batch: dict[str, np.ndarray], spec: DecodeSpec) -> dict[str, np.ndarray]:
    """Ray Data batch UDF: decode every row, marking failures instead of raising."""
    srcs = batch["path"] if "path" in batch else batch["image"]
    n = len(srcs)
    pixels = np.zeros((n, spec.size, spec.size, 3), dtype=np.uint8)
    ok = np.ones(n, dtype=bool)
    errors = np.full(n, "", dtype=object)
    for i, src in enumerate(srcs):
        try:
            pixels[i] = decode_image(src if isinstance(src, (str, bytes)) else bytes(src), spec)
        except Exception as e:  # every decoder failure is a per-image skip, reported upstream
            ok[i] = False
            errors[i] = f"{type(e).__name__}: {e}"[:300]
    out = {k: batch[k] for k in ("row", "id", "label", "split")}
    out.update(pixels=pixels, ok=ok, error=errors)
    return out
