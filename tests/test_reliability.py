"""Bad input, refused in one line or skipped and counted; the security rules. Every case here is a
row of docs/RELIABILITY.md, and `test_every_row_of_the_reliability_table_is_a_test` keeps the
table and the tests in step."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_image
from PIL import Image

from raylt.config import DataConfig, load_config
from raylt.errors import BackboneError, ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- images


def _jpeg(mode="RGB", size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 30) if mode == "RGB" else (0, 200, 200, 0)).save(buf, "JPEG")
    return buf.getvalue()


def _bomb(path: Path) -> None:
    # A 1-bit PNG of 20000 x 10000: a few KB on disk, 200 MP once decoded (over Pillow's 2x limit).
    Image.new("1", (20000, 10000)).save(path, optimize=True)


BAD_IMAGES = {
    "corrupt": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4), "a damaged PNG file (1,032 bytes): its header cannot be read"),
    "truncated_jpeg": (lambda p: p.write_bytes(_jpeg()[:300]), "truncated: the JPEG data ends after 300 bytes"),
    "zero_bytes": (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "text_file": (lambda p: p.write_text("not an image, a note someone saved as .jpg\n"), "not an image: 43 bytes of text"),
    "missing_file": (lambda p: None, "FileNotFoundError"),
    "decompression_bomb": (_bomb, "too large: 200,000,000 pixels"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_is_a_counted_skip_with_its_reason(tmp_path, case):
    from raylt.embed.images import DecodeSpec, decode_batch

    make, reason = BAD_IMAGES[case]
    good = write_image(tmp_path / "good.png", (10, 200, 10))
    bad = tmp_path / "bad.jpg"
    make(bad)
    batch = {"row": np.arange(2), "id": np.array(["good", "bad"], object), "label": np.zeros(2, np.int64),
             "split": np.array(["train"] * 2, object), "path": np.array([str(good), str(bad)], object)}
    out = decode_batch(batch, DecodeSpec(8))
    assert out["ok"].tolist() == [True, False]
    assert reason in out["error"][1] and out["error"][0] == ""
    assert out["pixels"][0].mean() > 0 and not out["pixels"][1].any()


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P", "P_transparency", "RGBA", "LA"])
def test_unusual_image_modes_become_the_same_rgb_pixels(tmp_path, mode):
    from raylt.embed.images import DecodeSpec, decode_image

    rgb = Image.new("RGB", (16, 16), (200, 100, 50))
    path = tmp_path / f"x.{'tif' if mode in ('CMYK', 'I;16') else 'png'}"
    if mode == "I;16":
        Image.new("I;16", (16, 16), 40000).save(path)
    elif mode.startswith("P"):
        pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
        pal.save(path, **({"transparency": 0} if mode == "P_transparency" else {}))
    else:
        rgb.convert(mode).save(path)
    out = decode_image(str(path), DecodeSpec(8)).astype(int)
    assert out.shape == (8, 8, 3)
    if mode == "I;16":
        assert abs(out.mean() - 40000 * 255 / 65535) <= 1  # rescaled, not clipped to 255
    elif mode == "LA":
        assert out.std() == 0 and abs(out.mean() - np.dot([200, 100, 50], [0.299, 0.587, 0.114])) <= 1
    else:  # CMYK round trips through ink values: a few levels off
        assert np.abs(out - [200, 100, 50]).max() <= (12 if mode == "CMYK" else 0)


def test_encoder_nan_or_inf_is_a_counted_skip():
    from raylt.embed.stage import usable_rows

    emb = np.ones((4, 3), np.float32)
    emb[1, 0], emb[2, 2] = np.nan, np.inf
    batch = {"ok": np.array([True, True, True, False]), "error": np.array(["", "", "", "unreadable"], object),
             "embedding": emb}
    ok, errors = usable_rows(batch)
    assert ok.tolist() == [True, False, False, False]
    assert "NaN or infinite" in errors[1] and "embed.precision=fp32" in errors[2] and errors[3] == "unreadable"
    assert batch["error"][1] == ""  # the input batch is not changed


# ----------------------------------------------------------------------------- split files


SPLIT_CASES = {
    "leaves_root": ("a/0.jpg 0\n../../etc/passwd 1\n", "path '../../etc/passwd' leaves the data root"),
    "absolute_path": ("a/0.jpg 0\n/etc/passwd 1\n", "path '/etc/passwd' leaves the data root"),
    "duplicate_path": ("a/0.jpg 0\nb/0.jpg 1\na/0.jpg 0\n", "lists 'train/a/0.jpg' more than once"),
    "label_not_integer": ("a/0.jpg 0\nb/0.jpg one\n", "train.txt:2: label 'one' is not an integer"),
    "label_negative": ("a/0.jpg 0\nb/0.jpg -1\n", "train.txt:2: label -1 is negative"),
    "label_out_of_range": ("a/0.jpg 0\nb/0.jpg 7\n", "label 7 of 'b/0.jpg' is outside 0..1"),
    "no_label": ("a/0.jpg 0\nb/0.jpg\n", "train.txt:2: expected '<relative path> <label>'"),
    "empty_split": ("# only a comment\n\n", "lists no images"),
    "class_without_train_image": ("a/0.jpg 0\na/1.jpg 0\n", "class 1 ('b') has no training image"),
    "missing_split_file": (None, "train.txt does not exist"),
}


@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_bad_split_file_is_refused_in_one_line(tmp_path, case):
    from raylt.data import load_source

    text, message = SPLIT_CASES[case]
    if text is not None:
        (tmp_path / "train.txt").write_text(text)
    (tmp_path / "names.txt").write_text("a\nb\n")
    cfg = DataConfig(source="split_file", root=str(tmp_path / "images"), split_dir=str(tmp_path),
                     splits={"train": "train.txt"}, class_names="names.txt")
    with pytest.raises(DataError) as e:
        load_source(cfg)
    assert message in one_line(e)


def test_a_split_file_label_that_would_size_arrays_is_refused_without_class_names(tmp_path):
    from raylt.data import load_source

    (tmp_path / "train.txt").write_text("a/0.jpg 0\nb/0.jpg 1\nc/0.jpg 1000000000\n")
    cfg = DataConfig(source="split_file", root=str(tmp_path / "images"), split_dir=str(tmp_path),
                     splits={"train": "train.txt"})
    with pytest.raises(DataError) as e:
        load_source(cfg)
    assert "have label 1000000000 but only 3 distinct labels; labels are class indices" in one_line(e)
    assert "train.txt" in one_line(e)


def test_split_file_paths_may_leave_the_root_only_when_allowed(tmp_path):
    from raylt.data import load_source

    outside = write_image(tmp_path / "elsewhere" / "x.png", (1, 2, 3))
    (tmp_path / "train.txt").write_text(f"{outside} 0\n")
    cfg = dict(source="split_file", root=str(tmp_path / "images"), split_dir=str(tmp_path), splits={"train": "train.txt"})
    with pytest.raises(DataError, match="leaves the data root; set data.allow_outside_root=true"):
        load_source(DataConfig(**cfg))
    src = load_source(DataConfig(**cfg, allow_outside_root=True))
    assert src.table["path"].to_pylist() == [str(outside)]


# ----------------------------------------------------------------------------- embeddings Parquet


def _emb_file(path: Path, x, labels, splits=None, **cols) -> Path:
    splits = splits or ["train"] * len(labels)
    table = {"embedding": x, "label": pa.array(labels), "split": pa.array(splits), **cols}
    pq.write_table(pa.table(table), path)
    return path


def _fixed(x: np.ndarray):
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])


def _emb_case(case: str, d: Path) -> Path:
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    y = [0, 0, 1, 1, 0, 1]
    if case in ("nan", "inf"):
        x[3, 1] = np.nan if case == "nan" else np.inf
        return _emb_file(d / "e.parquet", _fixed(x), y)
    if case == "mixed_sizes":
        _emb_file(d / "a.parquet", _fixed(x), y)
        _emb_file(d / "b.parquet", _fixed(x[:, :3]), y)
        return d
    if case == "ragged_rows":
        return _emb_file(d / "e.parquet", pa.array([list(r) for r in x[:5]] + [[1.0, 2.0]]), y)
    if case == "missing_column":
        pq.write_table(pa.table({"embedding": _fixed(x), "label": pa.array(y)}), d / "e.parquet")
        return d / "e.parquet"
    if case == "not_parquet":
        (d / "e.parquet").write_bytes(b"PAR1 this is not really parquet")
        return d / "e.parquet"
    if case == "float_labels":
        return _emb_file(d / "e.parquet", _fixed(x), [0.0, 0.5, 1.0, 1.0, 0.0, 1.0])
    if case == "negative_labels":
        return _emb_file(d / "e.parquet", _fixed(x), [0, -2, 1, 1, 0, 1])
    if case == "strings_as_embeddings":
        return _emb_file(d / "e.parquet", pa.array([["a"] * 4] * 6), y)
    if case == "no_train_split":
        return _emb_file(d / "e.parquet", _fixed(x), y, ["test"] * 6)
    if case == "zero_rows":
        x[[2, 4]] = 0
        return _emb_file(d / "e.parquet", _fixed(x), y)
    if case == "all_zero":
        return _emb_file(d / "e.parquet", _fixed(np.zeros_like(x)), y)
    if case == "one_vector":
        return _emb_file(d / "e.parquet", _fixed(np.ones_like(x)), y)
    if case == "label_sizes_arrays":
        return _emb_file(d / "e.parquet", _fixed(x), [0, 0, 1, 1, 1_000_000_000, 1])
    raise KeyError(case)


EMB_CASES = {
    "nan": "1 row\\(s\\) hold NaN or infinite values \\(first: row 3\\)",
    "inf": "1 row\\(s\\) hold NaN or infinite values",
    "mixed_sizes": "have mixed sizes \\[3, 4\\]",
    "ragged_rows": "row 5 has 2 values where the first has 4",
    "missing_column": "lacks column\\(s\\) \\['split'\\]",
    "not_parquet": "is not a readable Parquet file",
    "float_labels": "column 'label' of .* is double, not integers",
    "negative_labels": "have negative labels \\(e.g. -2\\)",
    "strings_as_embeddings": "column 'embedding' of .* not a list of floats",
    "no_train_split": "have no 'train' split",
    "zero_rows": "2 of 6 row\\(s\\) are all zeros \\(first: row 2\\)",
    "all_zero": "6 of 6 row\\(s\\) are all zeros",
    "one_vector": "all 6 rows are the same vector",
    "label_sizes_arrays": "have label 1000000000 but only 3 distinct labels; labels are class indices",
}


@pytest.mark.parametrize("case", sorted(EMB_CASES))
def test_bad_embeddings_are_refused_in_one_line(tmp_path, case):
    from raylt.embed.inputs import open_embeddings

    path = _emb_case(case, tmp_path)
    with pytest.raises(DataError) as e:
        open_embeddings(path)
    assert re.search(EMB_CASES[case], one_line(e)), str(e.value)


def test_labels_beyond_the_class_names_file_are_refused(tmp_path):
    from raylt.embed.inputs import open_embeddings

    x = np.arange(6, dtype=np.float32).reshape(3, 2) + 1
    f = _emb_file(tmp_path / "e.parquet", _fixed(x), [0, 1, 2])
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    with pytest.raises(DataError) as e:
        open_embeddings(f, str(tmp_path / "names.txt"))
    assert "have label 2 but only 2 class names" in one_line(e)


# ----------------------------------------------------------------------------- configs and YAML


def test_yaml_is_loaded_safely_so_a_config_cannot_run_code(tmp_path):
    marker = tmp_path / "ran"
    f = tmp_path / "evil.yaml"
    f.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "is not valid YAML" in one_line(e) and not marker.exists()
    with pytest.raises(ConfigError):  # overrides are parsed by the same safe loader
        load_config(None, [f"name=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", "config key 'train.epochs' on the command line must be >= 1, got 0"),
    ("sampler.kappa=-1", "config key 'sampler.kappa' on the command line must be >= 0"),
    ("data.splits=[a, b]", "config key 'data.splits' on the command line must be a mapping"),
    ("sampler.target=1000000000000", "config key 'sampler.target' on the command line must be <= 1,000,000, got "
                                     "1,000,000,000,000"),
    ("stats.rank=100000", "config key 'stats.rank' on the command line must be <= 1,024"),
    ("train.batch_size=99999999999", "config key 'train.batch_size' on the command line must be <= 16,777,216"),
    ("name=../../tmp/x", "config key 'name' on the command line must be one folder name"),
    ("name=a/b", "config key 'name' on the command line must be one folder name"),
    ("name=..", "config key 'name' on the command line must be one folder name"),
    ("name=.hidden", "config key 'name' on the command line must be one folder name"),
])
def test_out_of_range_and_wrongly_shaped_values_are_refused(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in one_line(e)


# ----------------------------------------------------------------------------- checkpoints and caches


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path):
    from raylt.embed.backbones import build_encoder
    from raylt.config import BackboneConfig

    marker = tmp_path / "ran"
    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _RunsCode(str(marker))}, ckpt)
    with pytest.raises(BackboneError) as e:
        build_encoder(BackboneConfig(name="open_clip", model="raylt-tiny-vit", pretrained=str(ckpt)))
    assert "cannot be loaded as plain weights" in one_line(e) and not marker.exists()


def test_a_checkpoint_that_is_not_one_is_refused(tmp_path):
    from raylt.embed.backbones import build_encoder
    from raylt.config import BackboneConfig

    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(b"<html>403 Forbidden</html>")  # what a failed download leaves behind
    with pytest.raises(BackboneError) as e:
        build_encoder(BackboneConfig(name="open_clip", model="raylt-tiny-vit", pretrained=str(ckpt)))
    assert "cannot be loaded as plain weights" in one_line(e) and "weights.pt" in str(e.value)


def test_secrets_never_reach_mlflow_params(monkeypatch):
    from raylt.tracking import flat_params, redact

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh123")
    cfg = load_config(None, ["tracking.uri=https://alice:${MLFLOW_TRACKING_PASSWORD}@mlflow.example:5000",
                             "backbone.cache_dir=/models/${HF_TOKEN}", "name=plain"])
    assert cfg.tracking.uri == "https://alice:hunter2-secret@mlflow.example:5000"  # expanded for use
    params = flat_params(cfg)
    text = " ".join(params.values())
    assert "hunter2" not in text and "hf_abcdefgh123" not in text
    assert params["tracking.uri"] == "https://alice:***@mlflow.example:5000"
    assert params["backbone.cache_dir"] == "/models/***" and params["name"] == "plain"
    assert redact("see http://127.0.0.1:5000/x") == "see http://127.0.0.1:5000/x"


# ----------------------------------------------------------------------------- the table


def test_every_row_of_the_reliability_table_is_a_test():
    """Each row of docs/RELIABILITY.md names a test that exists (and a parameter it has)."""
    table = (REPO / "docs" / "RELIABILITY.md").read_text()
    refs = re.findall(r"`(tests/(?:\w+/)?test_\w+\.py)::(\w+)(?:\[([\w;.-]+)\])?`", table)
    assert len({(f, t, p) for f, t, p in refs}) >= 25, len(refs)
    for file, test, param in refs:
        src = (REPO / file).read_text()
        assert re.search(rf"^(async )?def {test}\(", src, re.M), f"{file}::{test} in docs/RELIABILITY.md is not a test"
        if param:
            assert f'"{param}"' in src or f"'{param}'" in src or param in src, f"{file}::{test}[{param}] has no such case"
