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


def test_on_a_terminal_a_workers_epoch_lines_become_one_bar(capsys, monkeypatch):
    monkeypatch.setattr(console, "live", lambda: True)
    monkeypatch.setattr(console, "_bars", {})
    console._own_lines(batch([f"epoch {e}/3: train loss 0.{e}" for e in (1, 2, 3)]))
    console._own_lines(batch(["metrics written"]))
    out, err = capsys.readouterr()
    assert out.splitlines() == ["metrics written"] and console._bars == {}  # closed at the last epoch
    assert "epochs: 100%" in err and "3/3" in err and "train loss 0.3" in err


def test_off_a_terminal_progress_is_a_line_every_few_seconds_and_at_the_end(caplog, monkeypatch):
    import logging

    monkeypatch.setattr(console, "live", lambda: False)
    log = logging.getLogger("raylt.test")
    with caplog.at_level(logging.INFO, logger="raylt.test"):
        p = console.Progress("predicted", None, "rows", log, every=3600)
        p.update(5)  # unknown total: no end to reach, and not yet time for a line
        p.every = 0
        p.update(10, note="2 files")
        q = console.Progress("embedded", 4, "images", log, every=3600)
        q.update(4, line="all four")
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["predicted: 10 rows", "all four"]
    assert "2 files" in caplog.records[0].getMessage()
    assert [console.rate_text(r) for r in (1234.4, 12.34, 0.25)] == ["1234", "12.3", "0.25"]
