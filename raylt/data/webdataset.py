"""WebDataset tar shards: `<root>/<pattern>` per split, each sample an image member and a label
member that share a key (`n01440764_10026.jpg` + `n01440764_10026.cls`).

`data.splits` maps each split to a shard pattern relative to `data.root`, with brace ranges
and lists as WebDataset writes them (`train-{0000..0127}.tar`, `{a,b}.tar`). The label member
is chosen with `data.label_key`: `cls` (an integer), `txt` (a class name) or `json` (an object
whose `label` is either). Class names come from `data.class_names` (one per line, in label
order); without it, integer labels are named by their number and text labels are numbered in
sorted order of the train split's names.

Only the tar headers are read here: a row is the shard, the offset and the size of its image
member (`path`, `offset`, `size`), and the decode tasks read those bytes themselves, so the
driver never holds the images and every block reads only its own byte ranges. Ray Data's
`read_webdataset` reads and decodes every member in one pass; the embedding store needs every
row's id, label and split first (its fingerprint, its shard ranges, the class counts), which
the headers give at a fraction of the cost.

A sample without an image or a label member is a counted skip, reported with examples and
held to `data.max_bad_fraction`; a label outside the classes and a cut-short shard are
one-line errors naming the shard and the member.
"""

from __future__ import annotations

import json
import tarfile

import numpy as np

from raylt.config import DataConfig
from raylt.data.folder import IMAGE_EXTENSIONS
from raylt.data.shards import read_each, records_source, shard_files
from raylt.data.source import SOURCES, Source
from raylt.errors import ConfigError, DataError
from raylt.ops.storage import open_input, size_of

LABEL_KEYS = ("cls", "txt", "json")


def _key_and_ext(name: str) -> tuple[str, str]:
    """WebDataset's grouping: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def index_shard(path: str, filesystem=None) -> tuple[dict[str, dict], list[str]]:
    """key -> {"image": (offset, size, member name), label ext: bytes} of one shard, and the keys
    in shard order. On a local disk only headers are read, plus the (small) label members; an
    object is read once as a stream (a request per header would cost more than the bytes)."""
    samples: dict[str, dict] = {}
    last = None
    try:
        size = size_of(path, filesystem)
        stream = filesystem is not None
        with open_input(path, filesystem, stream) as f, tarfile.open(fileobj=f, mode="r|" if stream else "r:") as tar:
            for m in tar:  # plain tar: members are byte ranges of the file
                if m.isdir():
                    continue
                key, ext = _key_and_ext(m.name)
                if not m.isfile():  # a link (or a device, a FIFO) holds no bytes: its sample is a counted skip
                    samples.setdefault(key, {}).setdefault("links", []).append(m.name)
                    continue
                if m.offset_data + m.size > size:
                    raise tarfile.ReadError("member data runs past the end of the file")
                last = m.name
                sample = samples.setdefault(key, {})
                if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                    sample["image"] = (m.offset_data, m.size, m.name)
                elif ext in LABEL_KEYS:
                    sample[ext] = tar.extractfile(m).read()
            # tarfile ends quietly at a header cut short; a whole archive ends with two zero blocks
            if size - tar.offset < 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError("no end-of-archive marker")
    except FileNotFoundError:
        raise DataError(f"webdataset shard {path} does not exist; check data.root and data.splits") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        after = f" after member {last}" if last else ""
        raise DataError(f"webdataset shard {path} is cut short or damaged{after} ({e}); copy it again") from None
    return samples, list(samples)


def _label_value(raw: bytes, key: str, where: str):
    text = raw.decode("utf-8", errors="replace").strip()
    if key == "json":
        try:
            value = json.loads(text)["label"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{where}: the .json member has no \"label\"; write {{\"label\": ...}}") from None
        return value
    if key == "cls":
        try:
            return int(text)
        except ValueError:
            raise DataError(f"{where}: the .cls member {text[:40]!r} is not an integer label") from None
    return text


@SOURCES.register("webdataset")
def load_webdataset(cfg: DataConfig) -> Source:
    if cfg.label_key not in LABEL_KEYS:
        raise ConfigError(f"data.label_key {cfg.label_key!r} is not one of {', '.join(LABEL_KEYS)}")
    shards = shard_files(cfg)
    rows = {k: [] for k in ("id", "value", "split", "path", "offset", "size", "where")}
    skipped: list[str] = []
    for split, paths in shards.files.items():
        for shard, (samples, keys) in zip(paths, read_each(lambda p: index_shard(p, shards.filesystem), paths)):
            for key in keys:
                s = samples[key]
                missing = "image" if "image" not in s else f".{cfg.label_key}" if cfg.label_key not in s else None
                if missing:
                    links = f"; {', '.join(s['links'])} is a link, not a file: store the file itself" if "links" in s else ""
                    skipped.append(f"{shards.name(shard)}:{key} (no {missing} member{links})")
                    continue
                offset, size, member = s["image"]
                where = f"webdataset shard {shard} member {member}"
                rows["id"].append(f"{shards.name(shard)}/{key}")
                rows["value"].append(_label_value(s[cfg.label_key], cfg.label_key, where))
                rows["split"].append(split)
                rows["path"].append(str(shard))
                rows["offset"].append(offset)
                rows["size"].append(size)
                rows["where"].append(where)
    return records_source(cfg, shards, rows, skipped, "webdataset samples", "fix the shards or data.label_key",
                          ranges=lambda pick: (np.asarray(pick("offset"), np.int64), np.asarray(pick("size"), np.int64)))
