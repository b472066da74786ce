"""The BNS adapter as an artifact: `adapter.npz` (its weights as numpy arrays) and its forward
pass in numpy, so that the logged model applies the adapter without torch.

Input: the adapter's parameters `w1`, `b1`, `w2`, `b2` (raylt.methods.bns.adapter_params).
Output: `adapter.npz`, written atomically (the file marks an adapted folder complete), and
`adapter_numpy(params, x)`, equal to `ResidualAdapter.forward` (tanh GELU).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


def adapter_numpy(params: dict, x: np.ndarray) -> np.ndarray:
    """`raylt.methods.bns.ResidualAdapter.forward` in numpy (tanh GELU): params w1, b1, w2, b2."""
    h = x @ params["w1"].T + params["b1"]
    h = 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    z = x + h @ params["w2"].T + params["b2"]
    return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def save_adapter(params: dict, path: Path) -> None:
    tmp = path.with_name(f"tmp-{path.name}")
    np.savez(tmp, **params)
    os.replace(tmp, path)  # whole or absent: its presence marks the adapted folder complete


def load_adapter(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
