"""Feature adapter (pure core, torch): a residual MLP on frozen embeddings, trained before the head
with the balanced-negative-sampling (BNS) contrastive loss; the `ADAPTERS` registry.

Seed: stage 1 of "Long-Tailed Recognition via Information-Preservable Two-Stage Learning"
(arXiv 2510.08836), which learns the representation with a contrastive loss whose negatives
are balanced across classes, shown there to minimise intra-class distance. On frozen CLIP
features raylt learns only a small residual map, made concrete as:
- the adapter f(x) = normalize(x + W2 gelu(W1 x)), W2 started at zero, so training starts from
  the frozen features themselves and can only move away from them as far as the loss pays;
- two views of every embedding by embedding-space augmentation (feature dropout plus Gaussian
  noise of a given norm, then back to the sphere), since images are not at hand;
- a supervised contrastive loss whose denominator averages the negatives class by class
  (each class in the batch weighs the same, however many rows it brought), as in the
  class-averaging of Balanced Contrastive Learning (Zhu et al., CVPR 2022): head classes
  cannot dominate the negatives, which is what balanced negative sampling asks for;
- batches from the `BATCHES` registry: `instance` (rows as they come; the default) or
  `balanced` (classes drawn uniformly). On the Places-LT-shaped benchmark balanced batches,
  which repeat a 5-image class as often as a 5,000-image one, lost 5 points of overall
  accuracy to over-fitted tail rows (docs/RESULTS.md).

Input: embeddings [N, D] and labels [N]. Output: a trained `ResidualAdapter` (D -> D), applied
to every split before the class statistics and the head (raylt.methods.bns_ray); its weights
as `adapter.npz` and its numpy forward are in raylt.methods.bns_artifact.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from raylt.choices import ADAPTERS, BATCHES  # declared there: names, help, this module
from raylt.ops.optim import adamw_cosine, epoch_generator

ADAPTERS.register("none")("none")
ADAPTERS.register("bns")("bns")


class ResidualAdapter(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)  # identity at the start: the frozen features
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh-approximate GELU, so that raylt.pyfunc.adapter_numpy (numpy, no torch) computes the same map
        return F.normalize(x + self.fc2(F.gelu(self.fc1(x), approximate="tanh")), dim=1)


def adapter_params(adapter: ResidualAdapter) -> dict[str, np.ndarray]:
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in adapter.state_dict().items()}
    return {"w1": sd["fc1.weight"], "b1": sd["fc1.bias"], "w2": sd["fc2.weight"], "b2": sd["fc2.bias"]}


def two_views(x: torch.Tensor, gen: torch.Generator, noise: float, drop: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmentations of each row: features zeroed with probability `drop` (the rest
    rescaled), Gaussian noise of expected norm `noise`, back on the unit sphere."""
    d = x.shape[1]
    out = []
    for _ in range(2):
        keep = (torch.rand(x.shape, generator=gen, device=x.device) >= drop).to(x.dtype) / max(1.0 - drop, 1e-6)
        v = x * keep + torch.randn(x.shape, generator=gen, device=x.device) * (noise / math.sqrt(d))
        out.append(F.normalize(v, dim=1))
    return out[0], out[1]


def bns_loss(z1: torch.Tensor, z2: torch.Tensor, y: torch.Tensor, temperature: float,
             reduce: bool = True) -> torch.Tensor:
    """Supervised contrastive loss over both views with class-averaged negatives.

    For anchor i: -mean over positives p of log( exp(s_ip) / sum_k mean_{j in k, j != i} exp(s_ij) ),
    s = cosine / temperature, k over the classes in the batch (i's own class included, so
    positives also sit in the denominator, as in SupCon)."""
    z = torch.cat([z1, z2])
    yy = torch.cat([y, y])
    n = len(yy)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    s = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    s = s - s.max(1, keepdim=True).values.detach()
    _, cls = torch.unique(yy, return_inverse=True)
    onehot = F.one_hot(cls).to(z.dtype)  # [n, K]
    members = onehot.sum(0)[None, :] - onehot  # rows of each class, self excluded: [n, K]
    per_class = (s.exp() @ onehot) / members.clamp(min=1)
    log_denom = per_class.sum(1).log()
    pos = (yy[:, None] == yy[None, :]) & ~eye
    log_prob = s.masked_fill(~pos, 0.0) - log_denom[:, None]
    per_anchor = -(log_prob * pos).sum(1) / pos.sum(1).clamp(min=1)
    return per_anchor.mean() if reduce else per_anchor


@BATCHES.register("instance")
def instance_batches(y: np.ndarray, batch_size: int, per_class: int, steps: int,
                     gen: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(len(y), generator=gen)
    if steps * batch_size > len(y):  # more steps than one pass: wrap around
        order = order.repeat(math.ceil(steps * batch_size / len(y)))
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


@BATCHES.register("balanced")
def balanced_batches(y: np.ndarray, batch_size: int, per_class: int, steps: int,
                     gen: torch.Generator) -> list[torch.Tensor]:
    """`steps` batches of row indices: batch_size / per_class classes drawn uniformly without
    replacement (at most as many as there are), `per_class` rows each, with replacement."""
    order = np.argsort(y, kind="stable")
    present, starts, counts = np.unique(y[order], return_index=True, return_counts=True)
    order, starts, counts = map(torch.as_tensor, (order, starts, counts))
    k = max(1, min(batch_size // per_class, len(present)))
    out = []
    for _ in range(steps):
        cls = torch.randperm(len(present), generator=gen)[:k]
        offs = (torch.rand(k, per_class, generator=gen) * counts[cls, None]).long()
        out.append(order[(starts[cls, None] + offs).reshape(-1)])
    return out


def adapter_epoch(adapter: nn.Module, opt, x: torch.Tensor, y: np.ndarray, cfg, steps: int,
                  gen: torch.Generator) -> float:
    """One epoch of BNS training; the mean loss."""
    adapter.train()
    total = 0.0
    for idx in BATCHES.get(cfg.batches)(y, cfg.batch_size, cfg.per_class, steps, gen):
        xb = x[idx.to(x.device)]
        v1, v2 = two_views(xb, gen, cfg.noise, cfg.drop)
        loss = bns_loss(adapter(v1), adapter(v2), torch.as_tensor(y)[idx].to(x.device), cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total / max(steps, 1)


def fit_adapter_local(x: np.ndarray, y: np.ndarray, cfg, seed: int) -> ResidualAdapter:
    """The whole adapter fit in this process (no Ray): the epochs the Ray workers run."""
    torch.manual_seed(seed)
    adapter = ResidualAdapter(x.shape[1], cfg.hidden)
    opt, sched = adapter_optimizer(adapter, cfg)
    xt = torch.as_tensor(x, dtype=torch.float32)
    steps = adapter_steps(len(y), cfg, 1)
    for epoch in range(cfg.epochs):
        adapter_epoch(adapter, opt, xt, y, cfg, steps, epoch_generator(seed, epoch, 0))
        sched.step()
    return adapter


def adapter_optimizer(adapter: nn.Module, cfg):
    """AdamW (weight decay 1e-4) with a per-epoch cosine schedule over `adapter.epochs`."""
    return adamw_cosine(adapter.parameters(), cfg.lr, 1e-4, cfg.epochs)


def adapter_steps(n: int, cfg, world: int) -> int:
    """Steps per epoch and worker: one pass over the rows' worth of balanced batches."""
    return max(1, math.ceil(n / (cfg.batch_size * world)))
