"""`raylt tune`: the holdout, trials as MLflow child runs, best.yaml, bad search spaces."""


import json
from pathlib import Path

import numpy as np
import pytest

from raylt.cli import main
from raylt.config import load_config
from raylt.experiments.tune import best_row, trial_count
from raylt.head.posthoc import holdout

REPO = Path(__file__).resolve().parents[2]


def _store(tmp: Path) -> Path:
    return next((tmp / "store").glob("*/manifest.json")).parent


def test_holdout_takes_a_fifth_of_each_class_with_enough_rows_and_leaves_rare_ones_whole():
    y = np.repeat(np.arange(4), [100, 20, 5, 4])
    held = holdout(y, 4, 0, 0.2)
    assert np.bincount(y[held], minlength=4).tolist() == [20, 4, 1, 0]
    assert (holdout(y, 4, 0, 0.2) == held).all() and not (holdout(y, 4, 1, 0.2) == held).all()


@pytest.mark.ray
def test_the_trial_count_multiplies_the_samples_by_every_grid():
    space = {"sampler.target": {"grid": [0, 100, 300]}, "train.lr": {"choice": [0.1, 0.01]},
             "train.epochs": {"grid": [2, 4]}}
    assert trial_count(space, 4) == 24 and trial_count({"train.lr": {"choice": [0.1]}}, 8) == 8


def test_tune_scores_trials_on_held_out_rows_logs_child_runs_and_writes_a_best_config(demo_run, tmp_path, capsys,
                                                                                       caplog):
    import logging

    import mlflow

    caplog.set_level(logging.INFO, logger="raylt.experiments.tune")

    from raylt.embed.inputs import open_embeddings, read_split
    from raylt.head.estimator import LongTailHead
    from raylt.head.evaluate import evaluate

    cfg, _, tmp = demo_run
    db = f"sqlite:///{tmp / 'mlflow.db'}"
    (tmp_path / "space.yaml").write_text("sampler.target: {grid: [0, 300]}\ntrain.lr: {choice: [0.01]}\n")
    out = tmp_path / "tune"
    rc = main(["tune", str(REPO / "configs/demo.yaml"), "--embeddings", str(_store(tmp)), "--space",
               str(tmp_path / "space.yaml"), "--num-samples", "1", "--out", str(out), "train.epochs=6",
               f"tracking.uri={db}"])
    assert rc == 0
    # Progress counts against the trials asked for (1 sample x a grid of 2), not those started so far.
    done = [r.getMessage().split(" done")[0] for r in caplog.records if r.getMessage().startswith("tune: trial ")]
    assert done == ["tune: trial 1/2", "tune: trial 2/2"]
    report = json.loads((out / "tune.json").read_text())
    rows = {r["params"]["sampler.target"]: r for r in report["rows"]}
    assert sorted(rows) == [0, 300] and report["val_from"] == "holdout"
    best = min(report["rows"], key=lambda r: (-r["val_balanced"], r["val_nll"]))
    assert report["best"] == best
    # The trial trained what it says: the same estimator here gives its holdout and test scores.
    es = open_embeddings(_store(tmp))
    x, y = read_split(es, "train")
    held = holdout(y, es.num_classes, cfg.seed, cfg.head.holdout)
    xt, yt = read_split(es, "test")
    plain = load_config(REPO / "configs/demo.yaml", ["train.epochs=6", "train.lr=0.01", "sampler.target=0"])
    est = LongTailHead.from_config(plain).fit(x[~held], y[~held], x[held], y[held])
    counts = np.bincount(y[~held], minlength=es.num_classes)
    assert rows[0]["val_balanced"] == pytest.approx(est.fit_info_["val_balanced"], abs=0.02)
    direct = evaluate(est.predict(xt), yt, counts, es.class_names)["overall"]
    assert rows[0]["test_overall"] == pytest.approx(direct, abs=0.01)
    # best.yaml is the whole config with the best values, a run of its own in the same experiment.
    best_cfg = load_config(out / "best.yaml")
    assert best_cfg.sampler.target == best["params"]["sampler.target"] and best_cfg.train.epochs == 6
    assert best_cfg.name == "demo-tuned" and best_cfg.tracking.experiment == "demo" and best_cfg.head == cfg.head
    printed = capsys.readouterr().out
    assert f"config: {out / 'best.yaml'}" in printed and "(best)" in printed
    client = mlflow.MlflowClient(db)
    children = client.search_runs([client.get_experiment_by_name("demo").experiment_id],
                                  "attributes.run_name LIKE 'trial-%'")
    parent = client.get_run(children[0].data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "tune" and len(children) == 2
    assert parent.data.metrics["best_val_balanced"] == pytest.approx(best["val_balanced"])
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    history = client.get_metric_history(children[0].info.run_id, "val_top1")
    assert [m.step for m in history] == list(range(6))


def test_tune_refuses_a_bad_search_space_in_one_line(tmp_path, capsys):
    cases = [("sampler.targte: {choice: [1, 2]}\n", "unknown config key 'sampler.targte'"),
             ("sampler.target: {normal: [1, 2]}\n", "unknown search-space distribution 'normal'"),
             ("sampler.target: {choice: [a, b]}\n", "config key 'sampler.target'"),
             ("sampler.target: 5\n", "must be one distribution")]
    for text, message in cases:
        (tmp_path / "space.yaml").write_text(text)
        rc = main(["tune", str(REPO / "configs/demo.yaml"), "--space", str(tmp_path / "space.yaml"),
                   "tracking.enabled=false", f"store.root={tmp_path / 'store'}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and message in err[-1], err
    assert not (tmp_path / "store").exists()  # refused before any embedding


def test_best_rows_go_by_balanced_accuracy_then_nll_then_order():
    rows = [{"val_balanced": 0.5, "val_nll": 1.0}, {"val_balanced": 0.7, "val_nll": 2.0},
            {"val_balanced": 0.7, "val_nll": 1.5}, {"val_balanced": 0.7, "val_nll": 1.5}]
    assert best_row(rows) is rows[2]


def test_the_best_trial_run_through_raylt_fit_reproduces_its_val_score(ray_session, tmp_path):
    """tune -> best.yaml -> `raylt fit --config best.yaml`: the same recipe (one LongTailHead),
    so the fit's class-balanced val accuracy is the trial's."""
    from raylt.testing.simulate import clip_like, write_parquet

    counts = np.array([150] * 3 + [30] * 3 + [4] * 6)
    x, y, s = clip_like(counts, 25, splits=("val", "test"))
    write_parquet(x, y, s, tmp_path / "emb" / "part-0.parquet", [f"c{i}" for i in range(12)])
    (tmp_path / "space.yaml").write_text("sampler.target: {grid: [0, 100]}\nhead.tau: {grid: [0.5, 1.0]}\n")
    common = ["tracking.enabled=false", f"train.output_dir={tmp_path / 'outputs'}", "name=agree"]
    assert main(["tune", "--embeddings", str(tmp_path / "emb"), "--space", str(tmp_path / "space.yaml"),
                 "--num-samples", "1", "--out", str(tmp_path / "tune"), *common]) == 0
    report = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert report["val_from"] == "val" and len(report["rows"]) == 4
    best = report["best"]
    assert main(["fit", "--config", str(tmp_path / "tune" / "best.yaml"), "--embeddings", str(tmp_path / "emb"),
                 "--out", str(tmp_path / "fit"), "tracking.enabled=false"]) == 0
    m = json.loads((tmp_path / "fit" / "metrics.json").read_text())
    assert m["posthoc_from"] == "val" and m["temperature_from"] == "val"
    assert m["val_balanced"] == pytest.approx(best["val_balanced"], abs=1e-6), (m["val_balanced"], best)
    assert m["val_top1"] == pytest.approx(best["val_top1"], abs=1e-6)
