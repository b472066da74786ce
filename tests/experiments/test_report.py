"""`raylt report`: MLflow runs side by side with their config differences."""

import pytest

from raylt.cli import main


@pytest.mark.ray
def test_report_puts_runs_side_by_side_with_their_config_differences(demo_run, tmp_path, capsys):
    cfg, (recipe, baseline), tmp = demo_run
    db = f"sqlite:///{tmp / 'mlflow.db'}"
    assert main(["report", recipe.run_id, baseline.run_id, "--tracking-uri", db, "--out", str(tmp_path / "r")]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(ln for ln in lines if recipe.run_id[:8] in ln)
    m = recipe.metrics
    assert row.startswith(f"| run ({recipe.run_id[:8]}) | {m['overall']:.3f} | {m['many']:.3f} | {m['medium']:.3f} |")
    assert "head.loss=logit_adjusted" in row and "sampler.name=gaussian" in row and "train.epochs" not in row
    base = next(ln for ln in lines if baseline.run_id[:8] in ln)
    assert "head.loss=ce" in base and f"| {baseline.metrics['overall']:.3f} |" in base
    assert (tmp_path / "r" / "report.png").stat().st_size > 10_000
    assert (tmp_path / "r" / "report.md").read_text().splitlines()[2:] == [row, base]
    assert main(["report", "--experiment", "demo", "--tracking-uri", db, "--out", str(tmp_path / "e")]) == 0
    assert recipe.run_id[:8] in capsys.readouterr().out
    assert main(["report", "no-such-run", "--tracking-uri", db]) == 2
    assert "cannot read run(s) no-such-run" in capsys.readouterr().err
