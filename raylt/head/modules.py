"""Classifier heads and long-tail losses (pure core, torch): two registries.

Heads map embeddings [B, D] to logits [B, C]; only their parameters are trained.
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

from typing import Callable

import numpy as np
import torch
from torch import nn

from raylt.registry import Registry

HEADS: Registry[Callable[..., nn.Module]] = Registry("head")
LOSSES: Registry[Callable[..., Callable]] = Registry("loss")


class CosineHead(nn.Module):
    """Logits s * cos(x, w_c): the scale s sets how peaked the softmax can become."""

    def __init__(self, dim: int, num_classes: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) / dim**0.5)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = nn.functional.normalize(self.weight, dim=1)
        return self.scale * nn.functional.normalize(x, dim=1) @ w.T


@HEADS.register("linear", "affine layer W x + b")
def linear_head(dim: int, num_classes: int, scale: float) -> nn.Module:
    return nn.Linear(dim, num_classes)


@HEADS.register("cosine", "cosine similarity to class weights times head.scale")
def cosine_head(dim: int, num_classes: int, scale: float) -> nn.Module:
    return CosineHead(dim, num_classes, scale)


def build_head(name: str, dim: int, num_classes: int, scale: float, init: np.ndarray | None = None) -> nn.Module:
    """A head; `init` [C, D] (e.g. CLIP text embeddings of the class names) sets its weights,
    scaled for a linear head so that its initial logits match a cosine head's."""
    head = HEADS.get(name)(dim, num_classes, scale)
    if init is not None:
        w = torch.as_tensor(init, dtype=torch.float32)
        w = nn.functional.normalize(w, dim=1)
        with torch.no_grad():
            head.weight.copy_(w if isinstance(head, CosineHead) else w * scale)
            if getattr(head, "bias", None) is not None:
                head.bias.zero_()
    return head


def _log_prior(counts: np.ndarray) -> torch.Tensor:
    c = torch.as_tensor(np.asarray(counts, dtype=np.float64)).clamp(min=1)  # empty classes: count 1
    return (c / c.sum()).log().float()


@LOSSES.register("ce", "cross-entropy")
def ce_loss(counts: np.ndarray, tau: float) -> Callable:
    return nn.functional.cross_entropy


@LOSSES.register("logit_adjusted", "cross-entropy on logits + tau log prior (Menon et al. 2021)")
def logit_adjusted_loss(counts: np.ndarray, tau: float) -> Callable:
    shift = tau * _log_prior(counts)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits + shift.to(logits.device), y)

    return loss


@LOSSES.register("balanced_softmax", "cross-entropy on logits + log class count (Ren et al. 2020)")
def balanced_softmax_loss(counts: np.ndarray, tau: float) -> Callable:
    return logit_adjusted_loss(counts, 1.0)


def build_loss(name: str, counts: np.ndarray, tau: float) -> Callable:
    return LOSSES.get(name)(counts, tau)
