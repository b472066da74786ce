"""iNaturalist 2018/2021 annotation files (raylt.data.inat): the COCO-style structure, bad
records, and `raylt run configs/inat2018.yaml` through real Ray Data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import COLORS, counted_skip, write_image

from raylt.config import load_config
from raylt.data import load_source
from raylt.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
# iNaturalist's own layout: train_val2018/<supercategory>/<category id>/<hash>.jpg
SPECIES = [(0, "Aves", "Turdus migratorius"), (1, "Plantae", "Quercus alba"), (2, "Insecta", "Danaus plexippus"),
           (3, "Fungi", "Amanita muscaria")]


def write_inat(root: Path, name: str, counts, start_id: int = 0, drop=(), extra_ann=()) -> Path:
    """An annotation file with the real structure (info, images, annotations, categories,
    licenses), and an image written at every file_name under `root`."""
    images, anns = [], []
    i = start_id
    for (cid, sup, _), n in zip(SPECIES, counts):
        for _ in range(n):
            file_name = f"train_val2018/{sup}/{cid}/{i:08x}.jpg"
            write_image(root / file_name, COLORS[cid], size=(40, 30), fmt="JPEG")
            images.append({"id": i, "file_name": file_name, "width": 40, "height": 30, "license": 1,
                           "rights_holder": "someone"})
            if i not in drop:
                anns.append({"id": i, "image_id": i, "category_id": cid})
            i += 1
    anns += list(extra_ann)
    doc = {"info": {"year": 2018, "version": "1.0", "description": "test"}, "images": images, "annotations": anns,
           "categories": [{"id": cid, "name": nm, "supercategory": sup, "kingdom": "Animalia"}
                          for cid, sup, nm in SPECIES],
           "licenses": [{"id": 1, "name": "CC BY", "url": "http://creativecommons.org/licenses/by/4.0/"}]}
    path = root / name
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def inat(tmp_path) -> Path:
    root = tmp_path / "inat2018"
    write_inat(root, "train2018.json", [6, 4, 3, 2])
    write_inat(root, "val2018.json", [2, 2, 2, 2], start_id=1000)
    return root


def cfg_of(root: Path, *extra: str):
    return load_config(REPO / "configs/inat2018.yaml", [f"data.root={root}", f"data.split_dir={root}", *extra])


def test_categories_images_and_annotations_become_labelled_rows(inat):
    src = load_source(cfg_of(inat).data)
    assert src.class_names == tuple(nm for _, _, nm in SPECIES) and list(src.counts()) == [6, 4, 3, 2]
    assert src.splits() == ["test", "train"] and src.split("test").num_rows == 8
    first = src.table.slice(0, 1).to_pylist()[0]
    assert first["id"] == "train_val2018/Aves/0/00000000.jpg" and first["label"] == 0
    assert first["path"] == str(inat / "train_val2018/Aves/0/00000000.jpg")


def test_bad_records_are_counted_skips_or_one_line_errors_naming_file_and_annotation(inat, tmp_path, caplog):
    bad = tmp_path / "bad"
    write_inat(bad, "train2018.json", [6, 4, 3, 2])
    write_inat(bad, "val2018.json", [2, 2, 2, 2], start_id=1000, drop=(1003,))
    src = counted_skip(lambda *o: cfg_of(bad, *o), caplog,
                       "1 of 23 iNaturalist images skipped: val2018.json:train_val2018/Plantae/1/000003eb.jpg (no annotation)",
                       r"1 of 23 iNaturalist images cannot be used, above data.max_bad_fraction=0.01: "
                       r"val2018.json:.* \(no annotation\); a file without labels")
    assert src.split("test").num_rows == 7
    cases = [
        ({"id": 77, "image_id": 1000, "category_id": 9}, r"val2018.json annotation 77: category 9 is not one of the 4 "
                                                          r"train categories"),
        ({"id": 78, "image_id": 5555, "category_id": 0}, r"val2018.json annotation 78: image 5555 is not in the file"),
        ({"id": 79, "image_id": 1000, "category_id": 1}, r"val2018.json annotation 79: image 1000 is annotated twice"),
    ]
    for ann, message in cases:
        write_inat(bad, "val2018.json", [2, 2, 2, 2], start_id=1000, extra_ann=[ann])
        with pytest.raises(DataError, match=message):
            load_source(cfg_of(bad).data)
    (bad / "val2018.json").write_text('{"images": []}')
    with pytest.raises(DataError, match=r"val2018.json has no annotations, categories list; it is not a COCO-style"):
        load_source(cfg_of(bad).data)
    (bad / "val2018.json").write_text('{"images": [')
    with pytest.raises(DataError, match=r"val2018.json is not JSON"):
        load_source(cfg_of(bad).data)
    doc = json.loads((inat / "train2018.json").read_text())
    doc["images"][0]["file_name"] = "../../etc/passwd"
    (bad / "train2018.json").write_text(json.dumps(doc))
    write_inat(bad, "val2018.json", [2, 2, 2, 2], start_id=1000)
    with pytest.raises(DataError, match=r"train2018.json image 0: path '../../etc/passwd' leaves the data root"):
        load_source(cfg_of(bad).data)
    with pytest.raises(ConfigError, match="data.root is required for data.source=inat"):
        load_source(load_config(None, ["data.source=inat", "data.splits.train=x.json"]).data)


@pytest.mark.ray
def test_the_inat2018_job_config_runs_through_ray_data(ray_session, inat, tmp_path):
    from raylt.cli import main

    rc = main(["run", str(REPO / "configs/inat2018.yaml"), f"data.root={inat}", f"data.split_dir={inat}",
               "backbone.name=pixels", "backbone.model=null", "backbone.pretrained=null", "backbone.image_size=8", "train.epochs=2",
               f"store.root={tmp_path / 'store'}", f"train.output_dir={tmp_path / 'out'}", "tracking.enabled=false"])
    assert rc == 0
    metrics = json.loads((tmp_path / "out" / "inat2018" / "metrics.json").read_text())
    assert metrics["num_test"] == 8 and metrics["class_names"][0] == "Turdus migratorius"
    assert metrics["overall"] > 0.25  # above chance on colour classes
    # The first train image, embedded from the file its annotation names.
    import numpy as np
    import torch

    from raylt.embed.backbones import build_encoder
    from raylt.embed.images import decode_image
    from raylt.embed.store import read_store

    table = read_store(next((tmp_path / "store").glob("*/manifest.json")).parent)
    assert table.num_rows == 23 and table["id"][0].as_py() == "train_val2018/Aves/0/00000000.jpg"
    enc = build_encoder(load_config(None, ["backbone.image_size=8"]).backbone)
    direct = enc.encode(torch.from_numpy(np.array(decode_image(str(inat / table["id"][0].as_py()), enc.spec)[None])))
    assert np.allclose(np.asarray(table["embedding"][0].as_py()), direct.numpy()[0], atol=1e-5)
