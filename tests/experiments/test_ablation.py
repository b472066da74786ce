"""The ablation: the seed methods through the real pipeline on a local Ray (selection, the BNS
adapter stage and auxiliary classes in one fit), `raylt ablate` with MLflow child runs, and how it
composes its best recipe."""

import json
from pathlib import Path

import numpy as np
import pytest

from raylt.config import load_config
from raylt.embed.inputs import open_embeddings, read_split



@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """12 long-tailed target classes (D = 32) and 12 look-alike auxiliary classes."""
    from raylt.testing.simulate import LatentSpec, with_look_alikes, write_parquet

    tmp = tmp_path_factory.mktemp("corpora")
    counts = np.round(np.geomspace(150, 3, 12)).astype(int)
    (tx, ty, ts), (ax, ay, as_) = with_look_alikes(counts, 30, 20, LatentSpec(dim=32, classes_per_group=4, seed=2),
                                                   splits=("val", "test"))
    write_parquet(tx, ty, ts, tmp / "target" / "part-0.parquet", [f"t{i}" for i in range(12)])
    write_parquet(ax, ay, as_, tmp / "aux" / "part-0.parquet", [f"a{i}" for i in range(12)])
    return tmp, counts


def _overrides(tmp: Path, *extra: str) -> list[str]:
    return ["train.epochs=2", "train.batch_size=32", "adapter.epochs=2", "adapter.hidden=32", "selection.k=40",
            f"auxiliary.embeddings={tmp / 'aux'}", f"auxiliary.class_names={tmp / 'aux' / 'classnames.txt'}",
            "auxiliary.match=mean", "auxiliary.synonym=0.99", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", *extra]


@pytest.mark.ray
def test_one_fit_with_selection_adapter_and_auxiliary_classes(ray_session, corpora, tmp_path):
    import mlflow

    from raylt.pipeline import fit
    from raylt.head.artifact import head_logits, load_head

    tmp, counts = corpora
    cfg = load_config(None, _overrides(tmp, "selection.name=ip_dpp", "selection.every=1", "adapter.name=bns"))
    es = open_embeddings(tmp / "target", str(tmp / "target" / "classnames.txt"))
    r = fit(cfg, es, tmp_path / "out")
    m = r.metrics
    assert m["selected_per_round"] == int(np.minimum(counts, 40).sum()) and m["selection_rounds"] == 2
    assert m["auxiliary_classes"] > 0 and m["auxiliary_rows"] == 30 * m["auxiliary_classes"]
    assert m["real_per_epoch"] == m["selected_per_round"] + m["auxiliary_rows"]
    head = load_head(r.out / "head.npz")
    assert head.weight.shape == (12, 32)  # auxiliary rows dropped at inference
    assert set(head.adapter) == {"w1", "b1", "w2", "b2"} and np.abs(head.adapter["w2"]).sum() > 0
    # metrics.json scores the logged model on raw embeddings: adapter, then head, once.
    x, y = read_split(es, "test")
    assert (head_logits(head, x).argmax(1) == y).mean() == pytest.approx(m["overall"])
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(r.run_id)
    assert run.data.metrics["auxiliary_classes"] == m["auxiliary_classes"]
    assert [h.step for h in client.get_metric_history(r.run_id, "adapter_loss")] == [0, 1]
    assert len(client.get_metric_history(r.run_id, "val_top1")) == 2
    # A second run reuses the adapted embeddings and the finished checkpoints.
    again = fit(cfg, es, tmp_path / "out")
    assert again.metrics["overall"] == m["overall"] and again.metrics["seconds"]["adapter_s"] < 5


@pytest.mark.ray
def test_ablate_runs_the_recipes_in_parallel_as_mlflow_child_runs(ray_session, corpora, tmp_path, capsys):
    import mlflow

    from raylt.cli import main

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylt.head.text import zero_shot_logits
    from raylt.longtail import group_of

    tmp, counts = corpora
    out = tmp_path / "ablation"
    # Class text: noisy class means, as a Parquet file of (label, embedding) rows.
    es = open_embeddings(tmp / "target", str(tmp / "target" / "classnames.txt"))
    x, y = read_split(es, "train")
    means = np.stack([x[y == c].mean(0) for c in range(12)]) + np.random.default_rng(0).normal(0, 0.05, (12, 32))
    pq.write_table(pa.table({"label": list(es.class_names), "embedding": means.astype(np.float32).tolist()}),
                   tmp_path / "text.parquet")
    # Selection and the adapter: the single-fit test above; the default: test_pipeline.
    recipes = "ce,auxiliary,text_ensemble"
    code = main(["ablate", "--embeddings", str(tmp / "target"), "--class-names", str(tmp / "target" / "classnames.txt"),
                 "--class-text", str(tmp_path / "text.parquet"), "--out", str(out), "--recipes", recipes + ",best",
                 "--parallel", "2", *_overrides(tmp)])
    assert code == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "ablation.json").read_text())
    assert list(rows) == recipes.split(",") + ["best", "zero_shot"]
    for name, row in rows.items():
        assert f"| {name} | {row['overall']:.3f} |" in printed
        if name != "zero_shot":
            assert json.loads((out / name / "metrics.json").read_text())["overall"] == row["overall"]
    # The zero-shot row: the class text as a classifier on the same test split.
    xt, yt = read_split(es, "test")
    hit = zero_shot_logits(xt, means).argmax(1) == yt
    assert rows["zero_shot"]["overall"] == pytest.approx(hit.mean())
    few = np.isin(yt, np.flatnonzero(group_of(counts) == "few"))
    assert rows["zero_shot"]["few"] == pytest.approx(hit[few].mean())
    assert rows["text_ensemble"]["run_id"] and "text_ensemble_weight" in json.loads(
        (out / "text_ensemble" / "metrics.json").read_text())
    assert rows["best"]["from"][0] in ("ce", "logit_adjusted")
    assert (out / "ablation.png").stat().st_size > 10_000
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    children = {rows[n]["run_id"]: n for n in rows if n != "zero_shot"}  # zero-shot is no fit
    parents = {client.get_run(rid).data.tags.get("mlflow.parentRunId") for rid in children}
    assert len(parents) == 1 and None not in parents
    parent = client.get_run(parents.pop())
    assert parent.data.metrics["ce.overall"] == pytest.approx(rows["ce"]["overall"])
    assert parent.data.metrics["zero_shot.overall"] == pytest.approx(rows["zero_shot"]["overall"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"ablation.md", "ablation.png",
                                                                             "ablation.json"}
    assert client.get_run(rows["auxiliary"]["run_id"]).data.params["auxiliary.match"] == "mean"


def test_best_combination_takes_the_best_loss_and_sampler_and_the_add_ons_that_helped():
    from raylt.experiments.ablation import best_changes, choose, recipe_config

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
    assert not (plain.head.text_prior or plain.head.text_ensemble)
    # Without class text the text recipes are skipped (with a warning), the others run.
    assert choose(["ce", "text_prior", "default", "text_ensemble"], base, has_text=False) == ["ce", "default"]
