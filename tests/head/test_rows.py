"""The head's real rows when chosen: selection rounds, equal steps per rank (no Ray)."""

import numpy as np
import pytest

from raylt.errors import ConfigError, RayltError
from raylt.methods.selection import TrainRows, num_rounds, round_steps, train_rows


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
