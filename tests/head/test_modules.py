"""Heads and long-tail losses: their formulas, registries and text initialisation (no Ray)."""

import numpy as np
import pytest
import torch

from raylt.errors import ConfigError
from raylt.head.modules import build_head, build_loss


def test_logit_adjusted_and_balanced_softmax_match_their_formulas():
    counts = np.array([90, 9, 1])
    logits = torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    prior = counts / counts.sum()
    la = build_loss("logit_adjusted", counts, tau=0.7)(logits, y)
    shifted = logits + 0.7 * torch.log(torch.tensor(prior, dtype=torch.float32))
    assert torch.isclose(la, -torch.log_softmax(shifted, 1)[torch.arange(6), y].mean())
    bs = build_loss("balanced_softmax", counts, tau=0.0)(logits, y)
    n = torch.tensor(counts, dtype=torch.float32)
    p = n * logits.exp() / (n * logits.exp()).sum(1, keepdim=True)
    assert torch.isclose(bs, -p[torch.arange(6), y].log().mean(), atol=1e-6)
    assert torch.isclose(build_loss("ce", counts, 1.0)(logits, y), torch.nn.functional.cross_entropy(logits, y))


def test_unknown_registry_names_are_errors():
    with pytest.raises(ConfigError, match="did you mean 'logit_adjusted'"):
        build_loss("logit_adjust", np.ones(2), 1.0)
    with pytest.raises(ConfigError, match="registered: cosine, linear, whitened"):
        build_head("mlp", 4, 2, 1.0)


def test_text_initialised_heads_start_at_the_given_directions():
    init = np.random.default_rng(0).normal(size=(3, 8))
    unit = init / np.linalg.norm(init, axis=1, keepdims=True)
    for name in ("linear", "cosine"):
        head = build_head(name, 8, 3, scale=10.0, init=init)
        x = torch.tensor(unit, dtype=torch.float32)
        assert torch.equal(head(x).argmax(1), torch.arange(3))
