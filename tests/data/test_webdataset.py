"""WebDataset tar shards (raylt.data.webdataset): the index of headers and bad records. The run
through real Ray Data, whose decode tasks read the members' byte ranges, reads them from object
storage (tests/data/test_object_storage.py)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import COLORS, counted_skip, write_image

from raylt.config import load_config
from raylt.data import load_source
from raylt.data.shards import expand_braces
from raylt.embed.images import DecodeSpec, decode_batch, decode_image
from raylt.errors import ConfigError, DataError

NAMES = ["red", "green", "blue", "yellow"]


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, split: str, counts, per_shard: int = 5, label="cls", drop_label=()) -> list[Path]:
    """<root>/<split>-NNN.tar of coloured images (class c has counts[c]), each with its label member."""
    root.mkdir(parents=True, exist_ok=True)
    samples = [(c, i) for c, n in enumerate(counts) for i in range(n)]
    shards = []
    for k in range(0, len(samples), per_shard):
        path = root / f"{split}-{k // per_shard:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for c, i in samples[k:k + per_shard]:
                key = f"{NAMES[c]}/{split}_{c}_{i:04d}"
                img = write_image(root / ".tmp" / f"{key}.jpg", COLORS[c], size=(40, 30), fmt="JPEG")
                add(tar, f"{key}.jpg", img.read_bytes())
                if key in drop_label:
                    continue
                value = {"cls": str(c), "txt": NAMES[c], "json": json.dumps({"label": c})}[label]
                add(tar, f"{key}.{label}", value.encode())
        shards.append(path)
    return shards


def cfg_of(root: Path, *extra: str, train="train-{000..002}.tar", test="test-000.tar"):
    return load_config(None, ["data.source=webdataset", f"data.root={root}", f"data.splits.train={train}",
                              f"data.splits.test={test}", *extra])


@pytest.fixture
def shards(tmp_path) -> Path:
    root = tmp_path / "wds"
    write_shards(root, "train", [6, 4, 3, 2])  # 15 samples: 3 shards of 5
    write_shards(root, "test", [1, 1, 1, 1])
    return root


def test_brace_patterns_expand_as_webdataset_writes_them():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x-{8..10}.tar") == ["a/x-8.tar", "a/x-9.tar", "a/x-10.tar", "b/x-8.tar", "b/x-9.tar",
                                                    "b/x-10.tar"]
    assert expand_braces("one.tar") == ["one.tar"]
    with pytest.raises(ConfigError, match="runs backwards"):
        expand_braces("s-{5..1}.tar")


@pytest.mark.parametrize("label", ["cls", "txt", "json"])
def test_the_headers_give_every_sample_its_label_split_and_byte_range(tmp_path, label):
    root = tmp_path / "wds"
    write_shards(root, "train", [6, 4, 3, 2], label=label)
    write_shards(root, "test", [1, 1, 1, 1], label=label)
    names = tmp_path / "names.txt"
    names.write_text("\n".join(NAMES) + "\n")
    src = load_source(cfg_of(root, f"data.label_key={label}", f"data.class_names={names}").data)
    assert src.class_names == tuple(NAMES) and list(src.counts()) == [6, 4, 3, 2]
    assert src.split("test").num_rows == 4 and src.table["id"][0].as_py() == "train-000.tar/red/train_0_0000"
    # Each row's byte range is its image member: the decoded pixels are those of the image written.
    spec = DecodeSpec(size=8)
    batch = {c: src.table[c].to_numpy(zero_copy_only=False) for c in ("path", "offset", "size", "id", "label", "split")}
    batch["row"] = np.arange(src.table.num_rows)
    out = decode_batch(batch, spec)
    assert out["ok"].all()
    for i in (0, 7, 18):
        original = root / ".tmp" / (src.table["id"][i].as_py().split("/", 1)[1] + ".jpg")
        assert np.array_equal(out["pixels"][i], decode_image(str(original), spec))


def test_text_labels_without_a_class_list_are_numbered_in_sorted_order(tmp_path):
    root = tmp_path / "wds"
    write_shards(root, "train", [3, 2, 2, 1], label="txt")
    write_shards(root, "test", [1, 1, 1, 1], label="txt")
    src = load_source(cfg_of(root, "data.label_key=txt", train="train-{000..001}.tar").data)
    assert src.class_names == ("blue", "green", "red", "yellow") and list(src.counts()) == [2, 2, 3, 1]


def test_bad_records_are_counted_skips_or_one_line_errors_naming_shard_and_member(shards, tmp_path, caplog):
    # A sample without its label member: a counted skip, reported, held to data.max_bad_fraction.
    root = tmp_path / "skips"
    write_shards(root, "train", [6, 4, 3, 2], drop_label=("green/train_1_0002",))
    write_shards(root, "test", [1, 1, 1, 1])
    src = counted_skip(lambda *o: cfg_of(root, *o), caplog,
                       "1 of 19 webdataset samples skipped: train-001.tar:green/train_1_0002 (no .cls member)",
                       r"1 of 19 webdataset samples cannot be used, above data.max_bad_fraction=0.01: "
                       r"train-001.tar:green/train_1_0002")
    assert src.split("train").num_rows == 14
    # A label outside the class list names the shard and the member.
    names = tmp_path / "three.txt"
    names.write_text("red\ngreen\nblue\n")
    with pytest.raises(DataError, match=r"webdataset shard .*train-002.tar member yellow/train_3_0000.jpg: label 3 is "
                                        r"outside the 3 classes of data.class_names"):
        load_source(cfg_of(shards, f"data.class_names={names}").data)
    # A shard cut short names the shard and the last member read whole.
    cut = shards / "train-001.tar"
    cut.write_bytes(cut.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"webdataset shard .*train-001.tar is cut short or damaged"):
        load_source(cfg_of(shards).data)
    with pytest.raises(DataError, match=r"train-007.tar does not exist"):
        load_source(cfg_of(shards, train="train-{000,007}.tar").data)
    with pytest.raises(ConfigError, match="data.label_key 'png' is not one of cls, txt, json"):
        load_source(cfg_of(shards, "data.label_key=png").data)


def test_a_member_that_cannot_be_read_when_embedding_is_a_counted_skip(shards):
    src = load_source(cfg_of(shards).data)
    batch = {c: src.table[c].to_numpy(zero_copy_only=False)[:3] for c in ("path", "offset", "size", "id", "label", "split")}
    batch["row"] = np.arange(3)
    batch["size"] = batch["size"].copy()
    batch["size"][1] = 10**9  # the shard was cut since it was indexed
    batch["path"] = batch["path"].copy()
    batch["path"][2] = str(shards / "gone.tar")
    out = decode_batch(batch, DecodeSpec(size=8))
    assert list(out["ok"]) == [True, False, False]
    assert out["error"][1].startswith("EOFError: ") and "bytes into this member" in out["error"][1]
    assert out["error"][2].startswith("FileNotFoundError")


def test_a_sample_whose_image_member_is_a_link_is_a_counted_skip_that_says_so(tmp_path, caplog):
    root = tmp_path / "links"
    write_shards(root, "test", [1, 1, 1, 1])
    write_shards(root, "train", [6, 4, 3, 2])
    with tarfile.open(root / "train-000.tar", "a") as tar:  # appended after the shard's real samples
        for kind, key in ((tarfile.SYMTYPE, "red/sym"), (tarfile.LNKTYPE, "red/hard")):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.type, info.linkname = kind, "red/train_0_0000.jpg"
            tar.addfile(info)
            add(tar, f"{key}.cls", b"0")
        only = tarfile.TarInfo("red/alone.jpg")  # a sample of nothing but a link: still counted
        only.type, only.linkname = tarfile.SYMTYPE, "red/train_0_0001.jpg"
        tar.addfile(only)
    with caplog.at_level("WARNING", logger="raylt.data.shards"):
        src = load_source(cfg_of(root, "data.max_bad_fraction=0.2").data)
    assert ("3 of 22 webdataset samples skipped: train-000.tar:red/sym (no image member; red/sym.jpg is a link, "
            "not a file: store the file itself); train-000.tar:red/hard (no image member; red/hard.jpg is a link") \
        in caplog.text
    assert "train-000.tar:red/alone (no image member; red/alone.jpg is a link" in caplog.text
    assert src.split("train").num_rows == 15
