"""Auxiliary classes: neighbour silencing, the plan, per-class caps, text matching (no Ray)."""

import numpy as np
import pytest
import torch

from raylt.methods.auxiliary import cap_per_class, plan, silenced, silencing_mask


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
    from raylt.methods.auxiliary import auxiliary_rows
    from raylt.embed.backbones import BackboneError
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
