"""The seed methods' maths: auxiliary classes and neighbour silencing, the BNS adapter, the
selection rounds of the training rows, and how the ablation composes its best recipe."""

import numpy as np
import pytest
import torch

from raylt.adapter import (
    ResidualAdapter, adapter_params, balanced_batches, bns_loss, fit_adapter_local, instance_batches, two_views,
)
from raylt.auxiliary import cap_per_class, plan, silenced, silencing_mask
from raylt.config import AdapterConfig, load_config
from raylt.errors import ConfigError, RayltError
from raylt.pyfunc import adapter_numpy
from raylt.trainset import TrainRows, num_rounds, round_steps, train_rows

# ----------------------------------------------------------------------------- auxiliary classes


def test_silencing_mask_masks_each_class_s_neighbours_and_vice_versa():
    nb = np.array([[1, 0, 1], [0, 1, 0]], bool)  # target 0 ~ aux 0, 2; target 1 ~ aux 1
    m = silencing_mask(nb).numpy()
    assert m.shape == (5, 5) and (m == m.T).all() and not m.diagonal().any()
    assert m[0].tolist() == [False, False, True, False, True]
    assert m[1].tolist() == [False, False, False, True, False]
    assert m[2].tolist() == [True, False, False, False, False]  # aux 0 silences target 0 only
    assert not m[:2, :2].any() and not m[2:, 2:].any()  # targets never silence each other


def test_silenced_loss_is_cross_entropy_over_the_unmasked_classes_only():
    torch.manual_seed(0)
    nb = np.array([[1, 0], [0, 1], [1, 1]], bool)
    mask = silencing_mask(nb)
    logits = torch.randn(6, 5, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = silenced(torch.nn.functional.cross_entropy, mask)(logits, y)
    manual = []
    for i in range(6):
        keep = ~mask[y[i]]
        lg = logits[i][keep]
        manual.append(-(lg[int(keep[: y[i]].sum())] - torch.logsumexp(lg, 0)))
    assert float(loss.detach()) == pytest.approx(float(torch.stack(manual).mean().detach()), rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[mask[y]] == 0).all()  # a silenced logit gets no gradient at all
    assert (logits.grad[~mask[y]] != 0).all()


def test_plan_drops_near_synonyms_and_gives_tail_classes_more_neighbours():
    # 2 targets (head: 500 images, tail: 5), 5 auxiliary classes.
    sim_ta = np.array([[0.80, 0.70, 0.60, 0.95, 0.10],
                       [0.50, 0.75, 0.72, 0.20, 0.65]])
    sim_aa = np.eye(5)
    sim_aa[1, 2] = sim_aa[2, 1] = 0.93  # aux 1 and 2 are one concept: keep the better match (1)
    p = plan(sim_ta, sim_aa, np.array([500, 5]), [f"a{i}" for i in range(5)], neighbours=1, tail_neighbours=3,
             tail_below=20, synonym=0.9)
    assert p.dropped_synonyms == 2  # aux 3 (= target 0) and aux 2 (= aux 1)
    assert list(p.names) == ["a0", "a1", "a4"]
    assert p.neighbours.tolist() == [[True, False, False], [True, True, True]]


def test_plan_leaves_out_auxiliary_classes_nobody_chose():
    p = plan(np.array([[0.9, 0.1, 0.2]]), np.eye(3), np.array([100]), ["a", "b", "c"], 1, 1, 20, 0.99)
    assert list(p.names) == ["a"] and p.neighbours.shape == (1, 1)


def test_cap_per_class_keeps_at_most_cap_random_rows_of_each_class():
    y = np.repeat(np.arange(4), [50, 3, 10, 1])
    rows = cap_per_class(y, 5, seed=0)
    assert np.bincount(y[rows]).tolist() == [5, 3, 5, 1]
    assert (np.diff(rows) > 0).all()
    assert not np.array_equal(rows, cap_per_class(y, 5, seed=1))


def test_text_matching_drops_an_auxiliary_class_that_is_a_target_class_under_its_own_name():
    from raylt.auxiliary import auxiliary_rows
    from raylt.backbones import BackboneError
    from raylt.config import AuxiliaryConfig, BackboneConfig

    tiny = BackboneConfig(name="open_clip", model="raylt-tiny-vit")
    rng = np.random.default_rng(0)
    ax, ay = rng.normal(size=(40, 32)).astype(np.float32), np.repeat(np.arange(4), 10)
    cfg = AuxiliaryConfig(match="text", neighbours=1, tail_neighbours=2, per_class=6)
    p, rx, ry = auxiliary_rows(cfg, ["abbey", "desert sand", "field road"], np.array([500, 50, 5]),
                               rng.normal(size=(3, 32)), ax, ay, ["abbey", "church", "beach", "dune"], tiny, seed=0)
    assert "abbey" not in p.names and p.dropped_synonyms >= 1
    assert p.neighbours.sum(1).tolist() == [1, 1, 2]  # the 5-image class gets two neighbours
    assert np.bincount(ry - 3).tolist() == [6] * len(p.names)  # capped, labels after the 3 targets
    with pytest.raises(BackboneError, match="auxiliary.match=text .*needs a backbone with a text tower"):
        auxiliary_rows(cfg, ["a"], np.array([5]), rng.normal(size=(1, 32)), ax, ay, ["b", "c", "d", "e"],
                       BackboneConfig(name="pixels"), seed=0)


# ----------------------------------------------------------------------------- BNS adapter


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
    from raylt.simulate import LatentSpec, clip_like

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


# ----------------------------------------------------------------------------- selection rounds


def test_train_rows_select_per_round_and_keep_auxiliary_rows_in_every_round():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), [40, 8, 2])
    x = rng.normal(size=(len(y), 6)).astype(np.float32)
    rows = train_rows(x, y, "random_cap", k=10, rounds=3, seed=0, aux_x=x[:4], aux_y=np.array([3, 3, 4, 4]))
    for r in range(3):
        assert rows.counts(5, r).tolist() == [10, 8, 2, 2, 2]
    picked = [set(map(tuple, rows.x[(rows.keep >> r) & 1 == 1][rows.y[(rows.keep >> r) & 1 == 1] == 0]))
              for r in range(3)]
    assert picked[0] != picked[1]  # a new random subset each round
    target = rows.y < 3
    assert len(set(map(tuple, rows.x[target]))) == target.sum() <= len(y)  # each selected row once
    assert (~target).sum() == 4
    assert set(rows.y.tolist()) == {0, 1, 2, 3, 4} and rows.keep.min() > 0


def test_round_steps_are_equal_across_ranks_and_never_exceed_the_smallest_shard():
    y = np.arange(10)
    keep = np.array([3, 3, 3, 1, 1, 1, 1, 2, 1, 1], np.int64)  # round 1: rows 0-2 and 7 only
    rows = TrainRows(np.zeros((10, 2), np.float32), y, keep, rounds=2)
    assert round_steps(rows, workers=2, batch_size=2) == [3, 1]
    assert round_steps(rows, workers=1, batch_size=4) == [3, 1]
    bad = TrainRows(rows.x, y, np.array([3, 3, 3, 3, 3, 1, 1, 1, 1, 1], np.int64), rounds=2)
    with pytest.raises(RayltError, match="without rows"):
        round_steps(bad, workers=2, batch_size=2)


def test_selection_rounds_are_bounded():
    assert num_rounds(0, 30) == 1 and num_rounds(5, 30) == 6 and num_rounds(7, 30) == 5
    with pytest.raises(ConfigError, match="selection.every"):
        num_rounds(1, 100)


def test_train_epochs_use_only_the_rows_of_the_epoch_s_round():
    from raylt.config import HeadConfig, TrainConfig
    from raylt.heads import build_head
    from raylt.train import make_optimizer, train_epochs

    x = torch.randn(12, 4)
    y = torch.arange(12) % 3
    keep = torch.tensor([1] * 4 + [2] * 8)  # round 0: 4 rows, round 1: 8 rows
    cfg = TrainConfig(epochs=4, batch_size=4)
    head = build_head("linear", 4, 3, HeadConfig().scale)
    opt, sched = make_optimizer(head, cfg)
    stats = [st.real for _, st in train_epochs(head, torch.nn.functional.cross_entropy, opt, sched, x, y, None,
                                                np.zeros(3, np.int64), 0, cfg, range(4), steps=[1, 2], keep=keep,
                                                every=2)]
    assert stats == [4, 4, 8, 8]


# ----------------------------------------------------------------------------- names and composition


@pytest.mark.parametrize("override, match", [
    ("selection.name=dpp", "unknown selector 'dpp'"),
    ("adapter.name=bnss", "did you mean 'bns'"),
    ("auxiliary.match=names", "unknown auxiliary matcher 'names'"),
    ("adapter.batches=uniform", "unknown adapter batch sampler 'uniform'"),
])
def test_unknown_method_names_fail_before_any_work(override, match):
    from raylt.pipeline import check_names

    with pytest.raises(ConfigError, match=match):
        check_names(load_config(None, [override]))


def test_best_combination_takes_the_best_loss_and_sampler_and_the_add_ons_that_helped():
    from raylt.ablation import best_changes, recipe_config

    res = {"ce": 0.50, "logit_adjusted": 0.60, "balanced_softmax": 0.58, "gaussian": 0.55, "free_lunch": 0.57,
           "ip_dpp": 0.52, "bns": 0.49, "auxiliary": 0.51}
    changes, parts = best_changes({k: {"overall": v} for k, v in res.items()})
    assert parts == ["logit_adjusted", "free_lunch", "ip_dpp", "auxiliary"]
    base = load_config(None, ["auxiliary.embeddings=/data/aux", "selection.k=50", "sampler.target=300"])
    cfg = recipe_config(base, changes)
    assert (cfg.head.loss, cfg.sampler.name, cfg.selection.name, cfg.adapter.name) == \
        ("logit_adjusted", "free_lunch", "ip_dpp", "none")
    assert cfg.auxiliary.embeddings == "/data/aux" and cfg.selection.k == 50 and cfg.sampler.target == 300
    plain = recipe_config(base, {})
    assert (plain.head.loss, plain.sampler.name, plain.auxiliary.embeddings) == ("ce", "none", None)
