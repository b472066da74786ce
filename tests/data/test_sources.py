import pickle

import numpy as np
import pytest
from conftest import need_shared, write_image

from raylt import longtail
from raylt.config import DataConfig
from raylt.data import SOURCES, load_source
from raylt.data.splitfile import parse_split_file
from raylt.errors import ConfigError, DataError

def places_cfg(**kw):
    base = dict(source="split_file", root="/data/places365", split_dir=str(need_shared("places_lt")),
                splits={"train": "Places_LT_train.txt", "val": "Places_LT_val.txt", "test": "Places_LT_test.txt"},
                class_names="classnames.txt")
    return DataConfig(**{**base, **kw})


def test_registry_lists_sources_and_rejects_unknown():
    assert SOURCES.names() == ["cifar100", "demo", "folder", "inat", "parquet_images", "split_file", "webdataset"]
    with pytest.raises(ConfigError, match="unknown data source 'foldr' \\(did you mean 'folder'\\?\\)"):
        load_source(DataConfig(source="foldr"))


def test_real_places_lt_train_profile():
    src = load_source(places_cfg())
    counts = src.counts("train")
    assert src.num_classes == 365 and counts.sum() == 62_500
    assert counts.max() == 4_980 and counts.min() == 5
    assert longtail.group_sizes(counts) == {"many": 131, "medium": 163, "few": 71}
    assert src.split("val").num_rows == 7_300 and src.split("test").num_rows == 36_500
    assert src.table["path"][0].as_py() == "/data/places365/train/airfield/00004851.jpg"


def test_places_class_names_follow_folders_not_line_order():
    # The shipped class list is sorted differently from the labels around desert_road.
    src = load_source(places_cfg())
    t = src.split("train")
    for label in (116, 117, 118, 141, 142):
        path = t.filter(np.asarray(t["label"]) == label)["path"][0].as_py()
        assert src.class_names[label] == path.split("/")[-2]


def test_imagenet_lt_names_from_keyed_file():
    cfg = DataConfig(source="split_file", root="/data/in", split_dir=str(need_shared("imagenet_lt")),
                     splits={"train": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"}, class_names="classnames.txt")
    src = load_source(cfg)
    assert src.num_classes == 1000 and src.class_names[2] == "great white shark"
    assert src.split("test").num_rows == 50_000


def test_split_file_errors_name_file_and_line(tmp_path):
    f = tmp_path / "s.txt"
    cases = {
        "a.jpg 0\nbad_line_without_label\n": ":2: expected '<relative path> <label>'",
        "a.jpg 0\nb.jpg x\n": ":2: label 'x' is not an integer",
        "a.jpg -1\n": ":1: label -1 is negative",
        "../../etc/passwd 0\n": ":1: path '../../etc/passwd' leaves the data root",
        "/etc/passwd 0\n": ":1: path '/etc/passwd' leaves the data root",
        "\n# only a comment\n": "lists no images",
    }
    for text, msg in cases.items():
        f.write_text(text)
        with pytest.raises(DataError) as e:
            parse_split_file(f)
        assert msg in str(e.value) and str(f) in str(e.value)
    f.write_text("../shared/a.jpg 0\n")
    assert parse_split_file(f, allow_outside_root=True)[0] == ["../shared/a.jpg"]


def test_split_file_label_out_of_range_and_empty_class(tmp_path):
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    (tmp_path / "train.txt").write_text("a/1.jpg 0\nb/2.jpg 2\n")
    cfg = DataConfig(source="split_file", root=str(tmp_path), split_dir=str(tmp_path),
                     splits={"train": "train.txt"}, class_names="names.txt")
    with pytest.raises(DataError, match=r"train.txt: label 2 of 'b/2.jpg' is outside 0..1 \(2 names in"):
        load_source(cfg)
    (tmp_path / "train.txt").write_text("a/1.jpg 0\na/2.jpg 0\n")
    with pytest.raises(DataError, match=r"class 1 \('dog'\) has no training image"):
        load_source(cfg)
    (tmp_path / "train.txt").write_text("a/1.jpg 0\na/1.jpg 1\n")
    with pytest.raises(DataError, match="more than once"):
        load_source(cfg)
    with pytest.raises(DataError, match="split file .*missing.txt does not exist"):
        load_source(DataConfig(source="split_file", root=str(tmp_path), splits={"train": str(tmp_path / "missing.txt")}))
    with pytest.raises(ConfigError, match="data.root is required"):
        load_source(DataConfig(source="split_file", splits={"train": "x"}))


def test_folder_source_layout_and_longtail(image_tree):
    src = load_source(DataConfig(source="folder", root=str(image_tree)))
    assert src.class_names == ("blue", "green", "red", "yellow")
    assert list(src.counts("train")) == [3, 5, 8, 2] and src.split("test").num_rows == 8
    assert all(p.startswith(str(image_tree)) for p in src.table["path"].to_pylist())
    lt = load_source(DataConfig(source="folder", root=str(image_tree), imbalance_ratio=4, max_per_class=4))
    # profile floor(4 * 4^(-i/3)) = 4, 2, 1, 1, capped by what each class has
    assert list(lt.counts("train")) == [3, 2, 1, 1] and lt.split("test").num_rows == 8
    again = load_source(DataConfig(source="folder", root=str(image_tree), imbalance_ratio=4, max_per_class=4))
    assert again.table["id"].to_pylist() == lt.table["id"].to_pylist()


def test_folder_errors(image_tree, tmp_path):
    write_image(image_tree / "test" / "purple" / "x.png", (120, 0, 120))
    with pytest.raises(DataError, match="class 'purple' of split 'test' has no train folder"):
        load_source(DataConfig(source="folder", root=str(image_tree)))
    with pytest.raises(DataError, match="is not a folder"):
        load_source(DataConfig(source="folder", root=str(tmp_path / "nothing")))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="has no class folders"):
        load_source(DataConfig(source="folder", root=str(tmp_path / "empty")))


def write_cifar(root, per_class_train=500, per_class_test=100):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, per in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), per)
        data = np.zeros((len(labels), 3072), dtype=np.uint8)
        data[:, :1024] = (labels * 2)[:, None]  # a class-coded red channel
        files = [f"{name}_{i}.png".encode() for i in range(len(labels))]
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels.tolist(), b"filenames": files}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)]}, f)
    return d


def test_cifar100_lt_standard_profile(tmp_path):
    write_cifar(tmp_path)
    src = load_source(DataConfig(source="cifar100", root=str(tmp_path), imbalance_ratio=100, max_per_class=500))
    counts = src.counts("train")
    assert counts.sum() == 10_847 and counts[0] == 500 and counts[99] == 5
    assert list(np.bincount(src.split("test")["label"].to_numpy())) == [100] * 100
    assert src.class_names[3] == "class3"
    from raylt.embed.images import DecodeSpec, decode_image

    first = src.split("train").slice(0, 1)
    img = decode_image(first["image"][0].as_py(), DecodeSpec(32))
    assert img.shape == (32, 32, 3) and img[0, 0, 0] == 2 * first["label"][0].as_py()


def test_cifar_profiles_at_50_and_10():
    assert longtail.exponential_profile(500, 100, 100).sum() == 10_847
    assert longtail.exponential_profile(500, 100, 50).sum() == 12_608
    assert longtail.exponential_profile(500, 100, 10).sum() == 19_573


def test_cifar_missing_or_corrupt(tmp_path):
    with pytest.raises(DataError, match="no CIFAR-100 python files"):
        load_source(DataConfig(source="cifar100", root=str(tmp_path)))
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    (d / "train").write_bytes(b"not a pickle")
    (d / "meta").write_bytes(b"nope")
    with pytest.raises(DataError, match="is not a CIFAR-100 pickle"):
        load_source(DataConfig(source="cifar100", root=str(tmp_path)))


def test_demo_source_is_longtailed_offline_and_deterministic():
    src = load_source(DataConfig(source="demo", imbalance_ratio=20, test_per_class=40))
    counts = src.counts("train")
    assert src.num_classes == 10 and counts.max() / counts.min() >= 15
    assert list(np.bincount(src.split("test")["label"].to_numpy())) == [40] * 10
    assert longtail.group_sizes(counts)["few"] >= 2
    assert src.fingerprint() == load_source(DataConfig(source="demo", imbalance_ratio=20, test_per_class=40)).fingerprint()
    assert src.fingerprint() != load_source(DataConfig(source="demo", imbalance_ratio=10)).fingerprint()
