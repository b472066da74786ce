"""Evaluation: many / medium / few groups by train count (no Ray)."""

import numpy as np

from raylt.head.evaluate import evaluate


def test_evaluate_groups_by_train_count():
    train = np.array([150, 50, 5])
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 0, 2, 0])
    m = evaluate(pred, labels, train, ["a", "b", "c"])
    assert (m["overall"], m["many"], m["medium"], m["few"]) == (4 / 6, 1.0, 0.5, 0.5)
    assert m["per_class"] == [1.0, 0.5, 0.5] and m["train_counts"] == [150, 50, 5]
