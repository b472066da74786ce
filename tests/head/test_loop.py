"""The head's epoch core through `LongTailHead`: the default recipe against plain CE, selection
rounds, bf16 (no Ray)."""

import numpy as np
import torch

from raylt.config import HeadConfig
from raylt.head.estimator import LongTailHead
from raylt.head.evaluate import evaluate
from raylt.testing.simulate import clip_like


def _few_and_overall(head_name: str, **train) -> dict:
    """The sampler's recipe and plain CE, both without post-hoc offsets (no val rows)."""
    counts = np.array([300] * 6 + [40] * 6 + [4] * 12)
    x, y, s = clip_like(counts, 60)
    tr = s == "train"
    res = {}
    for name, loss in (("none", "ce"), ("gaussian", HeadConfig().loss)):
        est = LongTailHead(sampler=name, loss=loss, head=head_name, rank=8, target=100, posthoc="none", **train)
        res[name] = evaluate(est.fit(x[tr], y[tr]).predict(x[~tr]), y[~tr], counts, [str(i) for i in range(len(counts))])
    return res


def test_the_sampler_lifts_the_few_shot_classes_of_a_raw_linear_head():
    """On CLIP-like long-tailed embeddings, the sampler lifts the few-shot classes."""
    res = _few_and_overall("linear", epochs=15, batch_size=128, lr=0.01)
    assert res["gaussian"]["few"] > res["none"]["few"] + 0.1, res
    assert res["gaussian"]["overall"] > res["none"]["overall"]


def test_the_default_recipe_beats_plain_ce_and_the_raw_head():
    """The whitened head at the default training settings: the sampler still lifts the few-shot
    classes and the whole, and both beat the raw linear head's recipe above."""
    res = _few_and_overall("whitened")
    assert res["gaussian"]["few"] > res["none"]["few"] + 0.02, res
    assert res["gaussian"]["overall"] > res["none"]["overall"] + 0.02, res
    raw = _few_and_overall("linear")
    assert res["gaussian"]["overall"] > raw["gaussian"]["overall"] + 0.1, (res, raw)
    assert res["none"]["few"] > raw["none"]["few"] + 0.1, (res, raw)


def test_train_epochs_use_only_the_rows_of_the_epoch_s_round():
    from raylt.config import HeadConfig, TrainConfig
    from raylt.head.modules import build_head
    from raylt.head.loop import make_optimizer, train_epochs

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


def test_bf16_matrix_products_train_the_same_head_as_fp32():
    """train.precision: bf16 autocast of the head's forward reaches the fp32 head's top-1 on the
    same rows, keeps float32 parameters, and is deterministic; auto resolves per device."""
    import pytest

    from raylt.ops.precision import native_bf16, resolve

    counts = np.array([200] * 4 + [20] * 8)
    x, y, s = clip_like(counts, 50)
    tr = s == "train"
    heads, hits = {}, {}
    for precision in ("fp32", "bf16", "bf16"):
        est = LongTailHead(sampler="none", posthoc="none", epochs=3, batch_size=256, precision=precision)
        pred = est.fit(x[tr], y[tr]).predict(x[~tr])
        assert est.artifact_.weight.dtype == np.float32
        assert {h["precision"] for h in est.history_} == {precision}
        if precision in heads:
            np.testing.assert_array_equal(pred, heads[precision])  # same seed, same head
        heads[precision], hits[precision] = pred, (pred == y[~tr]).mean()
    assert abs(hits["bf16"] - hits["fp32"]) < 0.02, hits
    assert (heads["bf16"] == heads["fp32"]).mean() > 0.95
    assert resolve("auto", "cpu") == ("bf16" if native_bf16("cpu") else "fp32")
    assert resolve("fp32", "cpu") == "fp32" and resolve("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision 'fp8'"):
        resolve("fp8", "cpu")
