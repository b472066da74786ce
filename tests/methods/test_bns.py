"""The BNS adapter: its loss, batches, identity start, numpy copy and training (no Ray)."""

import numpy as np
import torch

from raylt.methods.bns import (
    ResidualAdapter, adapter_params, balanced_batches, bns_loss, fit_adapter_local, instance_batches, two_views,
)
from raylt.config import AdapterConfig
from raylt.methods.bns_artifact import adapter_numpy


def _naive_bns(z1, z2, y, t):
    z, yy = torch.cat([z1, z2]), torch.cat([y, y])
    s = z @ z.T / t
    out = []
    for i in range(len(yy)):
        denom = 0.0
        for c in yy.unique():
            idx = [j for j in range(len(yy)) if yy[j] == c and j != i]
            if idx:
                denom = denom + torch.exp(s[i, idx]).mean()
        pos = [j for j in range(len(yy)) if yy[j] == yy[i] and j != i]
        out.append(-torch.stack([s[i, p] - torch.log(denom) for p in pos]).mean())
    return torch.stack(out)


def test_bns_loss_matches_its_definition():
    torch.manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(7, 5), dim=1)
    z2 = torch.nn.functional.normalize(torch.randn(7, 5), dim=1)
    y = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    got = bns_loss(z1, z2, y, 0.2, reduce=False)
    assert torch.allclose(got, _naive_bns(z1, z2, y, 0.2), atol=1e-5)


def test_bns_negatives_are_balanced_a_class_weighs_the_same_however_many_rows_it_brings():
    torch.manual_seed(1)
    a = torch.nn.functional.normalize(torch.randn(2, 6), dim=1)  # class 0: the anchors
    b = torch.nn.functional.normalize(torch.randn(2, 6), dim=1)  # class 1: the negatives
    few = bns_loss(torch.cat([a, b]), torch.cat([a, b]), torch.tensor([0, 0, 1, 1]), 0.5, reduce=False)
    many_b = torch.cat([a, b.repeat(5, 1)])
    many = bns_loss(many_b, many_b, torch.tensor([0, 0] + [1] * 10), 0.5, reduce=False)
    assert torch.allclose(few[:2], many[:2], atol=1e-6)  # class 0's anchors see the same denominator


def test_balanced_batches_draw_classes_uniformly_from_a_long_tail():
    y = np.repeat(np.arange(10), [1000, 500, 200, 100, 50, 20, 10, 5, 2, 1])
    gen = torch.Generator().manual_seed(0)
    batches = balanced_batches(y, batch_size=12, per_class=3, steps=500, gen=gen)
    assert all(len(b) == 12 for b in batches)
    for b in batches[:20]:
        labels = y[b.numpy()]
        assert len(set(labels)) == 4 and all((labels == c).sum() == 3 for c in set(labels))
    freq = np.bincount(np.concatenate([y[b.numpy()] for b in batches]), minlength=10) / (500 * 12)
    assert np.allclose(freq, 0.1, atol=0.02)  # the 1-image class as often as the 1000-image one


def test_instance_batches_cover_every_row_once_per_pass():
    y = np.repeat(np.arange(3), [20, 9, 3])
    batches = instance_batches(y, batch_size=8, per_class=2, steps=4, gen=torch.Generator().manual_seed(0))
    assert sorted(torch.cat(batches).tolist()) == list(range(32))
    more = instance_batches(y, 8, 2, 6, torch.Generator().manual_seed(0))  # past one pass: wraps around
    assert [len(b) for b in more] == [8] * 6 and set(torch.cat(more).tolist()) == set(range(32))


def test_adapter_starts_as_the_identity_and_its_numpy_copy_agrees():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    ad = ResidualAdapter(8, 12)
    assert torch.allclose(ad(x), x, atol=1e-6)
    for p in ad.parameters():
        torch.nn.init.normal_(p, std=0.3)
    np.testing.assert_allclose(adapter_numpy(adapter_params(ad), x.numpy()), ad(x).detach().numpy(), atol=1e-5)


def test_two_views_stay_on_the_sphere_near_the_original():
    x = torch.nn.functional.normalize(torch.randn(100, 64), dim=1)
    v1, v2 = two_views(x, torch.Generator().manual_seed(0), noise=0.2, drop=0.1)
    assert torch.allclose(v1.norm(dim=1), torch.ones(100), atol=1e-5)
    cos = (v1 * x).sum(1)
    assert 0.8 < float(cos.mean()) < 0.99 and not torch.allclose(v1, v2)


def test_bns_training_pulls_classes_together_relative_to_their_distance():
    from raylt.testing.simulate import LatentSpec, clip_like

    x, y, s = clip_like(np.full(8, 60), 0, LatentSpec(dim=32, classes_per_group=4, seed=3), splits=())

    def ratio(z):
        mu = np.stack([z[y == c].mean(0) for c in range(8)])
        intra = np.mean([np.linalg.norm(z[y == c] - mu[c], axis=1).mean() for c in range(8)])
        inter = np.linalg.norm(mu[:, None] - mu[None], axis=2)[~np.eye(8, dtype=bool)].mean()
        return intra / inter

    cfg = AdapterConfig(name="bns", hidden=64, epochs=15, batch_size=64, lr=3e-3)
    ad = fit_adapter_local(x, y, cfg, seed=0)
    z = adapter_numpy(adapter_params(ad), x)
    assert ratio(z) < 0.8 * ratio(x), (ratio(z), ratio(x))
