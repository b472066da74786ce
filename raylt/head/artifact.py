"""The trained head as an artifact: `head.npz` (save, load) and its logits in numpy.

`head.npz` holds kind (`linear` or `cosine`), weight [C, D], bias [C], scale and, when the
features were adapted, the BNS adapter's weights (`adapter_w1` ...), applied before the head.
Only the target classes' rows are kept: auxiliary-class rows exist in training only. Reading
and scoring need neither torch nor Ray, so the logged model predicts from embeddings without
them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raylt.head.whiten import fold
from raylt.methods.bns_artifact import adapter_numpy


def save_head(state: dict, kind: str, scale: float, path: Path, num_targets: int | None = None,
              adapter: dict | None = None) -> None:
    """The trained head's parameters (a torch state dict) as numpy arrays: its first
    `num_targets` rows (auxiliary-class rows are dropped at inference) and, when features were
    adapted, the adapter's weights (`adapter_w1` ...), applied before the head. A whitened
    head (its state carries `transform` and `mean`) is folded into the plain linear form."""
    arr = lambda k: state[k].detach().cpu().numpy().astype(np.float32)  # noqa: E731
    w = arr("weight")
    b = arr("bias") if "bias" in state else np.zeros(len(w), np.float32)
    if "transform" in state:
        (w, b), kind = fold(w, b, arr("transform"), arr("mean")), "linear"
    n = len(w) if num_targets is None else num_targets
    extra = {f"adapter_{k}": v for k, v in (adapter or {}).items()}
    np.savez(path, kind=np.asarray(kind), weight=w[:n], bias=b[:n], scale=np.float32(scale), **extra)


def add_to_bias(path, delta: np.ndarray) -> None:
    """Rewrites `head.npz` with `delta` [C] added to its bias (post-hoc offsets)."""
    _rewrite(path, lambda a: {"bias": a["bias"].astype(np.float64) + delta})


def divide_logits(path, t: float) -> None:
    """Rewrites `head.npz` so that its logits are divided by `t` (a temperature): weight and
    bias of a linear head, the scale of a cosine head."""
    _rewrite(path, lambda a: {"scale": a["scale"] / t} if str(a["kind"]) == "cosine" else
             {"weight": a["weight"] / t, "bias": a["bias"] / t})


def _rewrite(path, change) -> None:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update({k: np.asarray(v, dtype=np.float32) for k, v in change(arrays).items()})
    np.savez(path, **arrays)


def load_head(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        adapter = {k[len("adapter_"):]: z[k] for k in z.files if k.startswith("adapter_")}
        return {"kind": str(z["kind"]), "weight": z["weight"], "bias": z["bias"], "scale": float(z["scale"]),
                "adapter": adapter or None}


def head_logits(head: dict, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if head.get("adapter"):
        x = adapter_numpy(head["adapter"], x)
    if head["kind"] == "cosine":
        w = head["weight"] / np.linalg.norm(head["weight"], axis=1, keepdims=True).clip(1e-12)
        return head["scale"] * (x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)) @ w.T
    return x @ head["weight"].T + head["bias"]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
