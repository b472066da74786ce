"""The driver's filter of Ray's worker lines (raylt.ops.console)."""

from __future__ import annotations

import pytest

from raylt.ops import console


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(console, "_printed", {})
    monkeypatch.setattr(console, "_seen", {})


def batch(lines, is_err=False, pid=7, actor="RayTrainWorker"):
    return {"pid": pid, "actor_name": actor, "is_err": is_err, "lines": [console.MARK + ln for ln in lines]}


def test_each_own_line_once_however_the_two_streams_interleave(capsys):
    # A Ray Train worker's stdout and stderr carry each line; their batches arrive in any order.
    console._own_lines(batch(["epoch 1/3", "epoch 3/3"]))
    console._own_lines(batch(["epoch 1/3", "epoch 3/3"], is_err=True))
    console._own_lines(batch(["epoch 1/3"], is_err=True, pid=8))  # another worker's line is its own
    console._own_lines({"pid": 7, "lines": ["(PlacementGroupCleaner pid=7) Failed to query", "INFO core_worker.cc"]})
    assert capsys.readouterr().out.splitlines() == ["epoch 1/3", "epoch 3/3", "epoch 1/3"]


def test_a_line_a_worker_prints_twice_is_shown_twice(capsys):
    console._own_lines(batch(["same", "same"]))
    console._own_lines(batch(["same"], is_err=True))
    console._own_lines(batch(["same"], is_err=True))
    assert capsys.readouterr().out.splitlines() == ["same", "same"]
