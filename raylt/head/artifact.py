"""The trained head as an artifact: `HeadArtifact`, saved as `head.npz`, and its logits in numpy.

`head.npz` holds kind (`linear` or `cosine`), weight [C, D], bias [C], scale and, when the
features were adapted, the BNS adapter's weights (`adapter_w1` ...), applied before the head.
Only the target classes' rows are kept: auxiliary-class rows exist in training only. Reading
and scoring need neither torch nor Ray, so the logged model predicts from embeddings without
them. Post-hoc offsets and a temperature are folded into weight, bias and scale, so serving
never changes when the recipe gains a step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import numpy as np

from raylt.head.whiten import fold
from raylt.methods.bns_artifact import adapter_numpy


@dataclass(frozen=True)
class HeadArtifact:
    """A trained head in its served form: logits = W x + b (`linear`) or scale cos(x, w_c)
    (`cosine`), after the optional adapter."""

    kind: str  # "linear" or "cosine"
    weight: np.ndarray  # [C, D] float32
    bias: np.ndarray  # [C] float32
    scale: float = 1.0
    adapter: dict | None = None  # the BNS adapter's arrays (w1, b1, w2, b2), applied first

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @classmethod
    def from_state(cls, state: dict, kind: str, scale: float, num_targets: int | None = None,
                   adapter: dict | None = None) -> "HeadArtifact":
        """From a trained head's torch state dict: its first `num_targets` rows (auxiliary-class
        rows are dropped at inference). A whitened head (its state carries `transform` and
        `mean`) is folded into the plain linear form."""
        arr = lambda k: state[k].detach().cpu().numpy().astype(np.float32)  # noqa: E731
        w = arr("weight")
        b = arr("bias") if "bias" in state else np.zeros(len(w), np.float32)
        if "transform" in state:
            (w, b), kind = fold(w, b, arr("transform"), arr("mean")), "linear"
        n = len(w) if num_targets is None else num_targets
        return cls(kind, w[:n], b[:n], float(scale), adapter or None)

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.adapter:
            x = adapter_numpy(self.adapter, x)
        if self.kind == "cosine":
            w = self.weight / np.linalg.norm(self.weight, axis=1, keepdims=True).clip(1e-12)
            return self.scale * (x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)) @ w.T + self.bias
        return x @ self.weight.T + self.bias

    def add_to_bias(self, delta: np.ndarray) -> "HeadArtifact":
        """Per-class offsets (post-hoc) added to the bias. A cosine head has a bias too: its
        logits are scale cos + b once offsets are added (the saved bias starts at zero)."""
        return dataclasses.replace(self, bias=(self.bias.astype(np.float64) + delta).astype(np.float32))

    def divide_logits(self, t: float) -> "HeadArtifact":
        """Logits divided by `t` (a temperature): weight and bias of a linear head, scale and
        bias of a cosine head."""
        bias = (self.bias / t).astype(np.float32)
        if self.kind == "cosine":
            return dataclasses.replace(self, scale=self.scale / t, bias=bias)
        return dataclasses.replace(self, weight=(self.weight / t).astype(np.float32), bias=bias)

    def save(self, path) -> None:
        extra = {f"adapter_{k}": v for k, v in (self.adapter or {}).items()}
        np.savez(path, kind=np.asarray(self.kind), weight=self.weight, bias=self.bias, scale=np.float32(self.scale),
                 **extra)


def load_head(path) -> HeadArtifact:
    with np.load(path, allow_pickle=False) as z:
        adapter = {k[len("adapter_"):]: z[k] for k in z.files if k.startswith("adapter_")}
        return HeadArtifact(str(z["kind"]), z["weight"], z["bias"], float(z["scale"]), adapter or None)


def head_logits(head: HeadArtifact, x: np.ndarray) -> np.ndarray:
    return head.logits(x)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
