"""Ray Train's local mode through raylt's harness: checkpoints kept in the run folder, resume
from them, the other-config refusal (no Ray started)."""

from dataclasses import dataclass

import pytest
import torch

from raylt.config import TrainConfig
from raylt.errors import RayltError
from raylt.ops.trainer import TrainerRun, prepare, report, resume, run_trainer, worker_context


@dataclass(frozen=True)
class Job:
    stop_after: int | None  # raise KeyboardInterrupt after this epoch (a Ctrl-C)


def loop(job: Job, run: TrainerRun) -> None:
    rank, world, device = worker_context(run)
    assert (rank, world, run.local) == (0, 1, True)
    torch.manual_seed(0)
    module, plain = prepare(torch.nn.Linear(3, 2), run, device)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    for epoch in range(resume(plain, opt, sched, run), run.epochs):
        with torch.no_grad():
            plain.bias += 1.0  # one step per epoch: the bias counts the epochs trained
        sched.step()
        report(plain, opt, sched, epoch, {"epoch": epoch}, rank, run)
        if job.stop_after == epoch:
            raise KeyboardInterrupt


def test_local_mode_keeps_checkpoints_in_the_run_folder_and_resumes_from_them(tmp_path):
    cfg = TrainConfig(epochs=5)
    assert cfg.num_workers == "auto"
    with pytest.raises(KeyboardInterrupt):
        run_trainer(loop, Job(stop_after=2), cfg, tmp_path, "train", "key-a", 5)
    kept = sorted(p.name for p in (tmp_path / "train").glob("checkpoint_*"))
    assert kept == ["checkpoint_local_000001", "checkpoint_local_000002"]  # the newest two
    state = run_trainer(loop, Job(stop_after=None), cfg, tmp_path, "train", "key-a", 5)
    assert state["epoch"] == 4
    torch.manual_seed(0)
    start = torch.nn.Linear(3, 2)
    # 3 epochs before the interrupt, 2 after: every epoch once, none repeated
    torch.testing.assert_close(state["model"]["bias"], start.bias.detach() + 5.0)
    with pytest.raises(RayltError, match="different config"):
        run_trainer(loop, Job(stop_after=None), cfg, tmp_path, "train", "key-b", 5)
