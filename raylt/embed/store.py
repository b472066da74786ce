"""The content-addressed embedding store: `<root>/<fingerprint>/part-*.parquet` + `manifest.json`.

The fingerprint hashes everything that changes the vectors: the backbone identity (model,
weights tag or checksum, preprocessing), the precision, the data set fingerprint and the
shard size. A finished store is reused; an unfinished one is completed shard by shard; a
different model or data set gets a different folder, so vectors never mix.

A shard covers a fixed range of source rows. It is done when its marker `part-K.json` exists
(written after the Parquet file, both by atomic rename). Rows whose image could not be read
are listed in the marker; such shards are tried again on the next run until the store is
complete, so a transient read error or a fixed image costs one shard, not the run.

Every shard's SHA-256 is in its marker and, once complete, in the manifest. `verify()` checks
them: a truncated, altered or missing shard (a bad disk, a copy cut short, an edit) is never
read as valid. `run_embed` recomputes such shards; readers refuse the store in one line.
Writers hold `<store>/.lock` (an advisory `flock`), so two runs of the same data set on one
machine or shared file system never interleave their shards: the second waits, then reuses.

Record columns: `embedding` fixed_size_list<float32>[D], `label` int64, `split` string, `id` string.
This module is the only one that reads or writes `manifest.json` (`is_store`, `read_manifest`).

`<root>/recipes/<key>.json` names the finished store of a config's recipe (`raylt.embed.recipe`):
the key is computed from the config and the data alone, without the model, so that a finished
store is found, checked and reused without importing torch or starting Ray.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raylt import __version__
from raylt.errors import DataError
from raylt.ops.hashing import file_sha256, json_key
from raylt.ops.locks import file_lock

log = logging.getLogger(__name__)
# In every store's, image cache's and recipe's key. 2: images are turned upright by their EXIF
# orientation before embedding, which changes the pixels (so the embeddings) of such photos.
STORE_FORMAT = 2
RECIPES = "recipes"  # <root>/recipes/<key>.json -> the store folder of that recipe
MANIFEST = "manifest.json"


def fingerprint(inputs: dict) -> str:
    """The store folder's name: a key of everything that changes the vectors."""
    return json_key(inputs)


def is_store(path: Path) -> bool:
    """Whether `path` is an embedding store (finished or not): it has a manifest."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: Path) -> dict:
    """The manifest of the store at `path`; a damaged one is a one-line error saying how to rebuild it."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}/{MANIFEST} is damaged; run `raylt embed` with the store's config to rebuild it") from None


# A full disk, a quota, a file-size limit: said in one line, with the folder and the bytes.
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _atomic_write_bytes(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must never publish bytes still in the page cache only
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # nothing half-written is left for a later run to read
        if e.errno in NO_ROOM:
            raise DataError(f"no room in {path.parent} to write {path.name} ({len(data):,} bytes): "
                            f"{os.strerror(e.errno)}; free space there (or set store.root to another disk) and "
                            f"run the same command again: what is finished is kept") from None
        raise


def atomic_write_table(table: pa.Table, path: Path) -> pa.Buffer:
    """`table` as a zstd Parquet file at `path`, published whole or not at all; its bytes
    (hashed in memory by the caller: no second read of the file)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue()
    _atomic_write_bytes(path, data)
    return data


def _read_json(path: Path) -> dict | None:
    """A JSON file of the store, or None when it is missing or cut short (a crash mid-write)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is damaged and is ignored: what it described is checked again", path)
        return None


def _write_json(path: Path, obj: dict) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def embedding_table(emb: np.ndarray, labels, splits, ids) -> pa.Table:
    """The record schema, with the embedding as fixed_size_list<float32> (not Ray's tensor type)."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    flat = pa.array(emb.reshape(-1), pa.float32())
    return pa.table(
        {
            "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]),
            "label": pa.array(np.asarray(labels, dtype=np.int64)),
            "split": pa.array(list(splits), pa.string()),
            "id": pa.array(list(ids), pa.string()),
        }
    )


@dataclass
class EmbeddingStore:
    path: Path
    inputs: dict
    num_rows: int
    shard_size: int
    _buffers: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root: Path, inputs: dict, num_rows: int) -> "EmbeddingStore":
        inputs = {**inputs, "store_format": STORE_FORMAT}
        path = Path(root) / fingerprint(inputs)
        store = cls(path, inputs, num_rows, int(inputs["shard_size"]))
        man = store.manifest()
        if man is not None and man.get("inputs") != json.loads(json.dumps(inputs, default=str)):
            raise DataError(f"embedding store {path} was made from other inputs; move it aside or pick another store.root")
        if man is None:
            path.mkdir(parents=True, exist_ok=True)
            # Under the writer lock: a writer that holds it clears half-written files, and a
            # manifest being written beside it is one of them.
            with store._lock():
                if store.manifest() is None:
                    store._write_manifest(status="incomplete")
        return store

    @staticmethod
    def recalled_name(root: Path, key: str) -> str | None:
        """The folder name `remember(key)` wrote under `root`, or None."""
        path = Path(root) / RECIPES / f"{key}.json"
        entry = _read_json(path)  # a record cut short: warned about there, and None
        if entry is None:
            return None
        name = entry.get("store") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or name != Path(name).name or name in (".", ".."):
            log.warning("%s is damaged (it names no store folder beside it) and is ignored: the store is looked "
                        "up by its inputs, and the record written again", path)
            return None
        return name

    @classmethod
    def recalled(cls, root: Path, key: str) -> "EmbeddingStore | None":
        """The finished store that `remember(key)` named under `root`, or None (never made, or
        since moved, made incomplete or made from other inputs: the full path decides then)."""
        name = cls.recalled_name(root, key)
        man = _read_json(Path(root) / name / MANIFEST) if name else None
        if man is None or man.get("status") != "complete" or man.get("fingerprint") != name:
            return None
        inputs = man["inputs"]
        return cls(Path(root) / name, inputs, int(man["num_rows"]), int(inputs["shard_size"]))

    def remember(self, key: str) -> None:
        """Name this finished store as the one of the recipe `key` (`raylt.embed.recipe`)."""
        (self.path.parent / RECIPES).mkdir(exist_ok=True)
        _write_json(self.path.parent / RECIPES / f"{key}.json", {"store": self.path.name})

    def _lock(self):
        return file_lock(self.path / ".lock", f"embedding store {self.path}", wait=True)

    @contextlib.contextmanager
    def writing(self) -> Iterator["EmbeddingStore"]:
        """Hold the store's writer lock (waiting for another writer), then clear half-written
        files of interrupted runs: once the lock is held, no live writer owns them."""
        with self._lock():
            for stale in self.path.glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)
            yield self

    # ------------------------------------------------------------------ state

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    def shard_rows(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num_rows)

    def manifest(self) -> dict | None:
        return _read_json(self.path / MANIFEST)

    def is_complete(self) -> bool:
        man = self.manifest()
        return man is not None and man.get("status") == "complete"

    def marker(self, k: int) -> dict | None:
        if not (self.path / f"part-{k:05d}.parquet").is_file():
            return None
        return _read_json(self.path / f"part-{k:05d}.json")

    def verify(self) -> dict[int, str]:
        """Shards whose Parquet file does not match its recorded checksum: {shard: why}."""
        man = self.manifest() or {}
        recorded = man.get("checksums", {}) if man.get("status") == "complete" else {}
        bad = {}
        for k in range(self.num_shards):
            name = f"part-{k:05d}.parquet"
            m = self.marker(k)
            want = recorded.get(name) or (m or {}).get("sha256")
            if m is None and not recorded:
                continue  # not written yet: pending, not damaged
            if not (self.path / name).is_file():
                bad[k] = "missing"
            elif want is None:
                bad[k] = "no checksum recorded"
            elif file_sha256(self.path / name) != want:
                bad[k] = "checksum mismatch"
        return bad

    def drop(self, shards) -> None:
        """Forget shards (marker first, so a crash in between leaves them pending) and mark the
        store incomplete: they are recomputed."""
        for k in shards:
            (self.path / f"part-{k:05d}.json").unlink(missing_ok=True)
            (self.path / f"part-{k:05d}.parquet").unlink(missing_ok=True)
        man = self.manifest() or {}
        if man.get("status") != "incomplete":
            self._write_manifest(status="incomplete")

    def retry_skipped(self) -> int:
        """Reopen a finished store some of whose images were skipped as unreadable, so that their
        shards are computed again (they are retried until the store is complete, not after);
        returns how many images that is."""
        n = len(self.skipped())
        if n and self.is_complete():
            self._write_manifest(status="incomplete")
        return n

    def pending_shards(self) -> list[int]:
        """Shards to (re)compute: no marker yet, or a marker with unread images."""
        if self.is_complete():
            return []
        out = []
        for k in range(self.num_shards):
            m = self.marker(k)
            if m is None or m["skipped"]:
                out.append(k)
        return out

    # ------------------------------------------------------------------ writing

    def add(self, rows: np.ndarray, emb: np.ndarray, ok: np.ndarray, labels, splits, ids, errors) -> list[int]:
        """Buffer a batch of results; write every shard it completes. Returns the shards written."""
        written = []
        shard_of = rows // self.shard_size
        for k in np.unique(shard_of):
            sel = shard_of == k
            buf = self._buffers.setdefault(int(k), [])
            buf.append(
                dict(rows=rows[sel], emb=emb[sel], ok=ok[sel], labels=np.asarray(labels)[sel],
                     splits=np.asarray(splits, dtype=object)[sel], ids=np.asarray(ids, dtype=object)[sel],
                     errors=np.asarray(errors, dtype=object)[sel])
            )
            lo, hi = self.shard_rows(int(k))
            if sum(len(b["rows"]) for b in buf) == hi - lo:
                self._write_shard(int(k), self._buffers.pop(int(k)))
                written.append(int(k))
        return written

    def _write_shard(self, k: int, parts: list[dict]) -> None:
        cat = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        order = np.argsort(cat["rows"], kind="stable")
        cat = {key: v[order] for key, v in cat.items()}
        lo, hi = self.shard_rows(k)
        if not np.array_equal(cat["rows"], np.arange(lo, hi)):
            raise RuntimeError(f"shard {k} received rows other than {lo}..{hi - 1} exactly once")
        ok = cat["ok"]
        table = embedding_table(cat["emb"][ok], cat["labels"][ok], cat["splits"][ok], cat["ids"][ok])
        data = atomic_write_table(table, self.path / f"part-{k:05d}.parquet")
        skipped = [{"id": i, "error": e} for i, e in zip(cat["ids"][~ok], cat["errors"][~ok])]
        _write_json(self.path / f"part-{k:05d}.json", {"rows": hi - lo, "embedded": int(ok.sum()), "skipped": skipped,
                                                      "sha256": hashlib.sha256(data).hexdigest()})

    def skipped(self) -> list[dict]:
        out = []
        for k in range(self.num_shards):
            m = self.marker(k)
            if m is not None:
                out += m["skipped"]
        return out

    def finalize(self, dim: int, extra: dict) -> dict:
        """Mark the store complete once every shard is written; returns the manifest."""
        markers = [self.marker(k) for k in range(self.num_shards)]
        missing = [k for k, m in enumerate(markers) if m is None]
        if missing:
            raise RuntimeError(f"embedding store {self.path}: shards {missing[:5]} are missing")
        files = [f"part-{k:05d}.parquet" for k in range(self.num_shards)]
        split_rows: dict[str, int] = {}
        for f in files:
            for c in pq.read_table(self.path / f, columns=["split"])["split"].value_counts().to_pylist():
                split_rows[c["values"]] = split_rows.get(c["values"], 0) + int(c["counts"])
        return self._write_manifest(
            status="complete",
            dim=dim,
            rows=self.num_rows,
            embedded=sum(m["embedded"] for m in markers),
            skipped=sum(len(m["skipped"]) for m in markers),
            split_rows=split_rows,
            files=files,
            checksums={f: m["sha256"] for f, m in zip(files, markers)},
            **extra,
        )

    def _write_manifest(self, **fields) -> dict:
        man = {
            "inputs": self.inputs,
            "fingerprint": self.path.name,
            "raylt_version": __version__,
            "num_rows": self.num_rows,
            "num_shards": self.num_shards,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **fields,
        }
        _write_json(self.path / MANIFEST, man)
        return man


def verified_files(path: Path, man: dict) -> list[Path]:
    """The Parquet files of a finished store, after checking them against its checksums."""
    if man.get("status") != "complete":
        raise DataError(f"{path} is not a finished embedding store; run `raylt embed` to complete it")
    files = [path / f for f in man["files"]]
    sums = man.get("checksums") or {}
    for f in files:
        why = ("is missing" if not f.is_file() else "has no checksum in the manifest" if f.name not in sums
               else "does not match its checksum" if file_sha256(f) != sums[f.name] else None)
        if why:
            raise DataError(f"embedding store {path} is damaged: {f.name} {why}; "
                            "run `raylt embed` (or `raylt run`) with its config to rebuild the damaged shards")
    return files


def read_store(path: str | os.PathLike, split: str | None = None) -> pa.Table:
    """All embedding records of a finished, verified store (optionally one split)."""
    path = Path(path)
    files = verified_files(path, _read_json(path / MANIFEST) or {})
    table = pa.concat_tables([pq.read_table(f) for f in files])
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    return table
