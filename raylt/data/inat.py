"""iNaturalist 2018 / 2021 annotation files (COCO style): `images` (id, file_name),
`annotations` (image_id, category_id) and `categories` (id, name), one file per split.

`data.splits` maps each split to its JSON file (relative to `data.split_dir`); image paths are
`file_name` under `data.root`. Labels are the category ids in sorted order (iNaturalist's ids
are 0..C-1 already, so a label is its id), class names the categories' `name`, taken from
the train file. A file name that leaves the root is refused unless `data.allow_outside_root`,
as for split files.

An image without an annotation (a test file released without labels) is a counted skip,
reported and held to `data.max_bad_fraction`; an annotation of an unknown image or category,
or an image annotated twice, is a one-line error naming the file and the annotation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raylt.config import DataConfig, expand_path
from raylt.data.lists import relative_path
from raylt.data.shards import check_skipped
from raylt.data.source import SOURCES, Source, apply_longtail, make_source, root_and_train
from raylt.data.splitfile import resolve_split
from raylt.errors import DataError


def read_annotations(path: Path) -> dict:
    """The parsed file, checked for the three lists this source reads."""
    if not path.is_file():
        raise DataError(f"iNaturalist annotation file {path} does not exist; check data.split_dir and data.splits")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"iNaturalist annotation file {path} is not JSON ({e}); copy it again") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k) if isinstance(data, dict) else None, list)]
    if missing:
        raise DataError(f"iNaturalist annotation file {path} has no {', '.join(missing)} list; "
                        "it is not a COCO-style annotation file")
    return data


def _rows(path: Path, data: dict, labels_of: dict, allow_outside_root: bool) -> tuple[list, list, list[str]]:
    """(file names, labels, skipped) of one split file."""
    files = {}
    for img in data["images"]:
        try:
            files[img["id"]] = relative_path(str(img["file_name"]), f"{path} image {img['id']}", allow_outside_root,
                                             "data.allow_outside_root=true")
        except (KeyError, TypeError):
            raise DataError(f"{path}: an image without `id` or `file_name` ({str(img)[:80]})") from None
    label_of: dict = {}
    for ann in data["annotations"]:
        where = f"{path} annotation {ann.get('id', '?') if isinstance(ann, dict) else '?'}"
        try:
            image, category = ann["image_id"], ann["category_id"]
        except (KeyError, TypeError):
            raise DataError(f"{where}: no `image_id` or `category_id`") from None
        if image not in files:
            raise DataError(f"{where}: image {image} is not in the file's images")
        if category not in labels_of:
            raise DataError(f"{where}: category {category} is not one of the {len(labels_of)} train categories; "
                            "fix the annotation or use the train file's categories")
        if image in label_of:
            raise DataError(f"{where}: image {image} is annotated twice; keep one label per image")
        label_of[image] = labels_of[category]
    names, labels, skipped = [], [], []
    for image, name in files.items():
        if image in label_of:
            names.append(name)
            labels.append(label_of[image])
        else:
            skipped.append(name)
    return names, labels, skipped


@SOURCES.register("inat")
def load_inat(cfg: DataConfig) -> Source:
    root = expand_path(root_and_train(cfg, "the image root the file names are under", "e.g. train2018.json"))
    where = {s: resolve_split(cfg, s) for s in cfg.splits}
    files = {s: read_annotations(p) for s, p in where.items()}
    try:
        categories = sorted((c["id"], str(c.get("name", c["id"]))) for c in files["train"]["categories"])
    except (KeyError, TypeError):
        raise DataError(f"{where['train']}: a category without `id`") from None
    labels_of = {cid: i for i, (cid, _) in enumerate(categories)}
    paths, labels, splits, skipped = [], [], [], []
    for split, data in files.items():
        names, lab, skip = _rows(where[split], data, labels_of, cfg.allow_outside_root)
        paths += names
        labels += lab
        splits += [split] * len(names)
        skipped += [f"{where[split].name}:{n} (no annotation)" for n in skip]
    check_skipped(skipped, len(paths) + len(skipped), cfg, "iNaturalist images",
                  "a file without labels (a test release) cannot be a split here")
    labels = np.asarray(labels, dtype=np.int64)
    keep = apply_longtail(paths, labels, splits, cfg, len(categories))
    return make_source(
        ids=[paths[i] for i in keep],
        labels=labels[keep],
        splits=[splits[i] for i in keep],
        class_names=[name for _, name in categories],
        origin=str(where["train"]),
        paths=[str(root / paths[i]) for i in keep],
    )

