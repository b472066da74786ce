"""Classifier heads and long-tail losses (pure core, torch): two registries.

Heads map embeddings [B, D] to logits [B, C]; only their parameters are trained. Every head
is saved as `linear` (W x + b) or `cosine` (raylt.head.artifact).
Losses take (logits, labels) and are built with the class counts of the training stream
(real plus synthetic), since that is the label distribution the head sees:
- `ce`: plain cross-entropy.
- `logit_adjusted`: Menon et al., "Long-tail learning via logit adjustment" (ICLR 2021),
  the loss form: cross-entropy on logits + tau log pi_y, pi the training label prior.
- `balanced_softmax`: Ren et al., "Balanced Meta-Softmax" (NeurIPS 2020): cross-entropy on
  logits + log n_y; the same as logit_adjusted with tau = 1.
At inference every head's plain logits are used: the adjustments only shape training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from raylt.choices import HEADS, LOSSES  # declared there: names, help, this module


class WhitenedLinear(nn.Module):
    """W' ((x - mean) T) + b': the linear head on whitened embeddings (raylt.head.whiten). T and
    mean are buffers, so checkpoints carry them and `save_head` folds them into W and b."""

    def __init__(self, dim: int, num_classes: int, whiten):
        super().__init__()
        inner = nn.Linear(dim, num_classes)
        self.weight, self.bias = inner.weight, inner.bias
        # Copies (D x D floats): the arrays may be read-only views on Ray's object store.
        self.register_buffer("transform", torch.tensor(whiten.transform, dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(whiten.mean, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Whiten whichever side is smaller, the B rows or the C weight rows (B D^2 or C D^2
        # flops): at Places-LT size a batch of 1,024 rows costs 3x more to whiten than 365
        # classes' weights, at iNaturalist size 8,142 classes cost 8x more than the batch.
        # The logits and gradients are the same either way.
        if len(x) < len(self.weight):
            return nn.functional.linear((x - self.mean) @ self.transform, self.weight, self.bias)
        w = self.weight @ self.transform.T  # raw-space W = W' T^T and b = b' - W mean
        return nn.functional.linear(x, w, self.bias - w @ self.mean)


class CosineHead(nn.Module):
    """Logits s * cos(x, w_c): the scale s sets how peaked the softmax can become."""

    def __init__(self, dim: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) / dim**0.5)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = nn.functional.normalize(self.weight, dim=1)
        return self.scale * nn.functional.normalize(x, dim=1) @ w.T


@dataclass(frozen=True)
class HeadSpec:
    build: Callable[..., nn.Module]  # (dim, num_classes, scale, whiten) -> module
    whitened: bool = False  # trains on whitened embeddings: needs a raylt.head.whiten.Whitening


HEADS.register("linear")(HeadSpec(lambda dim, c, scale, whiten: nn.Linear(dim, c)))
HEADS.register("whitened")(
    HeadSpec(lambda dim, c, scale, whiten: WhitenedLinear(dim, c, whiten), whitened=True))
HEADS.register("cosine")(
    HeadSpec(lambda dim, c, scale, whiten: CosineHead(dim, c, scale)))


def build_head(name: str, dim: int, num_classes: int, scale: float, init: np.ndarray | None = None,
               whiten=None) -> nn.Module:
    """A head; `init` [C, D] (e.g. CLIP text embeddings of the class names) sets its weights,
    scaled for a linear head so that its initial logits match a cosine head's. A whitened head
    takes `whiten` (raylt.head.whiten.Whitening) and starts from the same raw-space weights."""
    spec = HEADS.get(name)
    if spec.whitened and whiten is None:
        raise ValueError(f"head {name!r} needs the whitening of the train embeddings")
    head = spec.build(dim, num_classes, scale, whiten)
    if init is not None:
        w = nn.functional.normalize(torch.as_tensor(init, dtype=torch.float32), dim=1)
        if not isinstance(head, CosineHead):
            w = w * scale
        with torch.no_grad():
            if spec.whitened:  # W' with W' T^T = W, and b' = W mean so that the raw bias is 0
                head.weight.copy_(torch.as_tensor(whiten.whitened_weights(w.numpy())))
                head.bias.copy_(w @ torch.as_tensor(whiten.mean))
            else:
                head.weight.copy_(w)
                if getattr(head, "bias", None) is not None:
                    head.bias.zero_()
    return head


def _log_prior(counts: np.ndarray) -> torch.Tensor:
    c = torch.as_tensor(np.asarray(counts, dtype=np.float64)).clamp(min=1)  # empty classes: count 1
    return (c / c.sum()).log().float()


@LOSSES.register("ce")
def ce_loss(counts: np.ndarray, tau: float) -> Callable:
    return nn.functional.cross_entropy


@LOSSES.register("logit_adjusted")
def logit_adjusted_loss(counts: np.ndarray, tau: float) -> Callable:
    shift = tau * _log_prior(counts)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits + shift.to(logits.device), y)

    return loss


@LOSSES.register("balanced_softmax")
def balanced_softmax_loss(counts: np.ndarray, tau: float) -> Callable:
    return logit_adjusted_loss(counts, 1.0)


def build_loss(name: str, counts: np.ndarray, tau: float) -> Callable:
    return LOSSES.get(name)(counts, tau)
