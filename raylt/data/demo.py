"""The built-in demo data set: scikit-learn's bundled handwritten digits, long-tailed.

It needs no download: 1,797 8x8 digit scans ship inside scikit-learn. Each is rendered as an
RGB image of `data.image_size` pixels; `data.test_per_class` images per class form a
balanced test split, and the rest, subsampled to the exponential profile with
`data.imbalance_ratio`, the train split.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from raylt.config import DataConfig
from raylt.data.source import SOURCES, Source, apply_longtail, make_source, png_bytes

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def render_digit(pixels8x8: np.ndarray, size: int) -> np.ndarray:
    """A 16-level 8x8 digit scan as a dark-on-light RGB image of size x size."""
    gray = (255 - pixels8x8 * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img.convert("RGB"))


@SOURCES.register("demo")
def load_demo(cfg: DataConfig) -> Source:
    from sklearn.datasets import load_digits  # scikit-learn only for the demo (its import takes a second)

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(labels))
    test_per_class = 40 if cfg.test_per_class is None else cfg.test_per_class
    splits = np.full(len(labels), "train", dtype=object)
    for c in range(len(DIGIT_NAMES)):
        idx = order[labels[order] == c][:test_per_class]
        splits[idx] = "test"
    keep = apply_longtail(None, labels, splits, cfg, len(DIGIT_NAMES))
    return make_source(
        ids=[f"{splits[i]}/digit-{i:04d}" for i in keep],
        labels=labels[keep],
        splits=[str(splits[i]) for i in keep],
        class_names=DIGIT_NAMES,
        origin="built-in digits",
        images=[png_bytes(render_digit(digits.images[i], cfg.image_size)) for i in keep],
    )
