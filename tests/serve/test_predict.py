"""`raylt predict` and serving: the demo run's registered model over its store, image files
and a list file, and `mlflow models serve` answering HTTP requests on loopback."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from conftest import free_port, http_process
from raylt.cli import main
from raylt.embed.inputs import open_embeddings, read_split
from raylt.head.artifact import HeadArtifact, head_logits, load_head
from raylt.serve.load import load

pytestmark = pytest.mark.ray
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _store(tmp: Path) -> Path:
    return next((tmp / "store").glob("*/manifest.json")).parent


def test_predict_over_the_store_matches_the_runs_own_evaluation(demo_run, tmp_path, capsys):
    cfg, (recipe, baseline), tmp = demo_run
    assert recipe.model_uri.startswith("models:/demo/") and baseline.model_uri.startswith("models:/m-")
    out = tmp_path / "pred.parquet"
    rc = main(["predict", recipe.model_uri, str(_store(tmp)), "--split", "test", "--top-k", "3", "--out", str(out),
               "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"])
    assert rc == 0
    t = pq.read_table(out)
    x, y = read_split(open_embeddings(_store(tmp)), "test")
    assert t.num_rows == len(y) and t["row"].to_pylist() == list(range(len(y)))
    assert t["label"].to_pylist() == y.tolist() and t["error"].null_count == t.num_rows
    pred = head_logits(load_head(recipe.out / "head.npz"), x).argmax(1)
    assert t["label_1"].to_pylist() == pred.tolist()
    assert np.mean(pred == y) == pytest.approx(recipe.metrics["overall"])
    p = np.stack([t[f"prob_{j}"].to_numpy() for j in (1, 2, 3)], axis=1)
    assert (np.diff(p, axis=1) <= 0).all() and (p.sum(1) <= 1 + 1e-6).all()
    assert t["class"].to_pylist()[:3] == [DIGITS[v] for v in y[:3]]
    printed = capsys.readouterr().out
    assert f"accuracy on the {len(y)} labelled rows: top-1 {recipe.metrics['overall']:.3f}" in printed


@pytest.fixture(scope="module")
def digit_files(demo_run, tmp_path_factory):
    """30 of the demo's test images as PNG files under class folders, one corrupt file, and a
    list file naming them with labels; plus the head's predictions for the 30 from the store."""
    from raylt.data import load_source

    cfg, (recipe, _), tmp = demo_run
    root = tmp_path_factory.mktemp("digits")
    table = load_source(cfg.data).table
    test = table.filter(pc.equal(table["split"], "test")).slice(0, 30)
    names = DIGITS
    lines = []
    for i, (img, lab) in enumerate(zip(test["image"].to_pylist(), test["label"].to_pylist())):
        rel = f"{names[lab]}/{i:02d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(img)
        lines.append(f"{rel} {lab}")
    (root / "zero" / "99-corrupt.png").write_bytes(b"not an image")
    lines.append("zero/99-corrupt.png 0")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    x, _ = read_split(open_embeddings(_store(tmp)), "test")  # the store keeps source order
    return root, head_logits(load_head(recipe.out / "head.npz"), x[:30]).argmax(1), test["label"].to_numpy()


def test_predict_over_a_list_file_embeds_the_images_and_keeps_unreadable_rows(demo_run, digit_files, tmp_path,
                                                                              capsys):
    cfg, (recipe, _), tmp = demo_run
    root, expected, labels = digit_files
    out = tmp_path / "pred.csv"
    assert main(["predict", f"runs:/{recipe.run_id}/model", str(root / "list.txt"), "--out", str(out),
                 "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]) == 0
    t = pcsv.read_csv(out, convert_options=pcsv.ConvertOptions(strings_can_be_null=True))
    assert t.num_rows == 31 and t.column_names[:4] == ["row", "id", "label", "class"]
    assert t["label_1"].to_pylist()[:30] == expected.tolist()
    last = t.slice(30).to_pylist()[0]
    assert last["id"] == "zero/99-corrupt.png" and last["class_1"] is None
    assert last["error"].startswith("not an image: ")
    printed = capsys.readouterr().out
    assert "without a prediction: 1 rows; the `error` column says why" in printed
    assert f"accuracy on the 30 labelled rows: top-1 {np.mean(expected == labels):.3f}" in printed


def test_predict_over_an_image_folder_with_a_fits_output_folder(demo_run, digit_files, tmp_path):
    cfg, (recipe, _), tmp = demo_run
    root, expected, _ = digit_files
    (root / "list.txt").rename(root.parent / f"{root.name}-list.txt")  # only images in the folder
    try:
        out = tmp_path / "pred.parquet"
        assert main(["predict", str(recipe.out), str(root), "--out", str(out), "--top-k", "1"]) == 0
    finally:
        (root.parent / f"{root.name}-list.txt").rename(root / "list.txt")
    t = pq.read_table(out)
    assert t.column_names == ["row", "id", "class_1", "label_1", "prob_1", "error"]
    by_id = dict(zip(t["id"].to_pylist(), t["label_1"].to_pylist()))
    names = DIGITS
    ids = sorted(f"{names[lab]}/{i:02d}.png" for i, lab in enumerate(digit_files[2]))
    assert sorted(by_id) == sorted(ids + ["zero/99-corrupt.png"])
    assert [by_id[f"{names[lab]}/{i:02d}.png"] for i, lab in enumerate(digit_files[2])] == expected.tolist()


def test_predict_refuses_bad_requests_in_one_line(demo_run, tmp_path, capsys):
    cfg, (recipe, _), tmp = demo_run
    db = f"sqlite:///{tmp / 'mlflow.db'}"
    cases = [
        (["models:/no-such-model/1", str(_store(tmp))], "cannot load model models:/no-such-model/1"),
        ([str(recipe.out), str(tmp_path / "nothing")], "does not exist; pass embeddings, an image folder or a list"),
        ([str(recipe.out), str(_store(tmp)), "--top-k", "11"], "--top-k 11 must be between 1 and the model's 10"),
        ([str(recipe.out), str(tmp_path)], "holds no images"),
    ]
    for args, message in cases:
        assert main(["predict", *args, "--out", str(tmp_path / "p.parquet"), "--tracking-uri", db]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) >= 1 and message in err[-1] and err[-1].startswith("raylt: error: ")
    assert not (tmp_path / "p.parquet").exists()


def test_registered_model_served_over_http_answers_embeddings_and_images(demo_run, digit_files, tmp_path):
    import requests

    cfg, (recipe, _), tmp = demo_run
    root, expected, _ = digit_files
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The server runs `uvicorn` from PATH: the environment's bin folder, as when it is activated.
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    args = [sys.executable, "-m", "mlflow", "models", "serve", "-m", recipe.model_uri, "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with http_process(args, tmp_path / "serve.log", f"{url}/ping", "mlflow models serve", env=env):
        x, _ = read_split(open_embeddings(_store(tmp)), "test")
        r = requests.post(f"{url}/invocations", timeout=60,
                          json={"dataframe_split": {"columns": ["embedding"], "data": [[v] for v in x[:30].tolist()]}})
        assert r.status_code == 200, r.text[:500]
        rows = r.json()["predictions"]
        assert len(rows) == 30 and list(rows[0])[:2] == ["zero", "one"]
        assert [int(np.argmax(list(p.values()))) for p in rows] == expected.tolist()
        images = [base64.b64encode((root / "zero" / f).read_bytes()).decode() for f in sorted(os.listdir(root / "zero"))
                  if f.endswith(".png") and "corrupt" not in f]
        r = requests.post(f"{url}/invocations", timeout=60,
                          json={"dataframe_split": {"columns": ["image"], "data": [[b] for b in images]}})
        assert r.status_code == 200, r.text[:500]
        zeros = [i for i, lab in enumerate(digit_files[2]) if lab == 0]
        assert [int(np.argmax(list(p.values()))) for p in r.json()["predictions"]] == expected[zeros].tolist()
        # Malformed requests: a 400 whose message names the row and what is wrong, no traceback;
        # the server goes on serving.
        nan = [float("nan")] * x.shape[1]
        malformed = {
            "wrong width": (["embedding"], [[x[0, :5].tolist()]], f"expected embeddings of size {x.shape[1]}"),
            "NaN": (["embedding"], [[x[0].tolist()], [nan]], "the embedding in row 1 holds NaN or infinite values"),
            "not an image": (["image"], [[images[0]], [base64.b64encode(b"a note, not a picture").decode()]],
                             "the image in row 1: not an image: 21 bytes of text"),
            "cut base64": (["image"], [[images[0][:-7]]], "the image in row 0 is not valid base64"),
            "empty batch": (["embedding"], [], "the request holds no rows"),
        }
        for case, (columns, data, message) in malformed.items():
            r = requests.post(f"{url}/invocations", timeout=60, data=json.dumps(
                {"dataframe_split": {"columns": columns, "data": data}}), headers={"Content-Type": "application/json"})
            assert 400 <= r.status_code < 500 and f"raylt: {message}" in r.json()["message"], (case, r.text[:800])
            assert "Traceback" not in r.text and "stack_trace" not in r.json(), case
        r = requests.post(f"{url}/invocations", timeout=60,
                          json={"dataframe_split": {"columns": ["embedding"], "data": [[x[0].tolist()]]}})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1
        # Under a small concurrent load (bench/serve_load.py goes further): no failed request.
        for split in ({"columns": ["embedding"], "data": [[v] for v in x[:64].tolist()]},
                      {"columns": ["image"], "data": [[images[0]]]}):
            stats = load(f"{url}/invocations", json.dumps({"dataframe_split": split}).encode(), clients=4, seconds=2)
            assert stats.failed == 0 and stats.requests >= 4 and stats.p50_ms <= stats.p99_ms, stats.first_failure


def test_score_batch_ranks_classes_and_keeps_rows_it_cannot_score():
    from raylt.serve.predict import score_batch, top_k

    rng = np.random.default_rng(0)
    head = HeadArtifact("linear", rng.normal(size=(4, 3)).astype(np.float32), np.zeros(4, np.float32))
    rows = [rng.normal(size=3).astype(np.float32) for _ in range(5)]
    rows[2] = np.array([np.nan, 0, 0], np.float32)
    batch = {"embedding": np.array(rows + [None], dtype=object)[:-1], "label": np.array([0, 1, 2, 7, 3]),
             "id": np.array(list("abcde"), dtype=object)}
    t = score_batch(batch, head, ("w", "x", "y", "z"), k=2)
    assert t.column_names == ["id", "label", "class", "class_1", "label_1", "prob_1", "class_2", "label_2", "prob_2",
                              "error"]
    logits = np.stack([rows[i] for i in (0, 1, 3, 4)]) @ head.weight.T
    best = np.argsort(-logits, axis=1)[:, :2]
    assert [t["label_1"][i].as_py() for i in (0, 1, 3, 4)] == best[:, 0].tolist()
    assert [t["label_2"][i].as_py() for i in (0, 1, 3, 4)] == best[:, 1].tolist()
    assert t["label_1"][2].as_py() is None and "NaN or infinite" in t["error"][2].as_py()
    assert t["label"][3].as_py() is None and t["class"][3].as_py() is None  # label 7: not one of the classes
    assert t["class"].to_pylist()[:2] == ["w", "x"] and t["error"].null_count == 4
    labels, probs = top_k(np.log(np.array([[0.1, 0.6, 0.3]])), 3)
    assert labels.tolist() == [[1, 2, 0]] and probs == pytest.approx(np.array([[0.6, 0.3, 0.1]]))


@pytest.mark.ray
def test_predict_over_a_plain_embeddings_file_without_ids_or_labels(demo_run, tmp_path):
    import pyarrow as pa

    cfg, (recipe, _), tmp = demo_run
    x, _ = read_split(open_embeddings(_store(tmp)), "test")
    emb = [list(map(float, v)) for v in x[:20]]
    emb[5] = [float("inf")] * x.shape[1]
    pq.write_table(pa.table({"embedding": pa.array(emb, pa.list_(pa.float64()))}), tmp_path / "mine.parquet")
    assert main(["predict", str(recipe.out), str(tmp_path / "mine.parquet"), "--out", str(tmp_path / "p.parquet"),
                 "--top-k", "2"]) == 0
    t = pq.read_table(tmp_path / "p.parquet")
    assert t.column_names == ["row", "class_1", "label_1", "prob_1", "class_2", "label_2", "prob_2", "error"]
    pred = head_logits(load_head(recipe.out / "head.npz"), x[:20]).argmax(1)
    assert [v for i, v in enumerate(t["label_1"].to_pylist()) if i != 5] == np.delete(pred, 5).tolist()
    assert t["label_1"][5].as_py() is None and t["error"][5].as_py().startswith("the embedding holds NaN")
