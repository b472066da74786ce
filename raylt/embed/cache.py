"""The image cache: every embedding an encoder has made, keyed by the image's content.

`<store.root>/images/<encoder key>/part-<uuid>.parquet` holds `hash` (SHA-256 of the encoded
bytes, fixed_size_binary[32]) and `embedding` (fixed_size_list<float32>[D]). The encoder key
covers what changes the vectors apart from the data: the backbone identity, the precision and
the store format. An image embedded once by an encoder is never embedded again by it, whichever
data set, split file or version names it: adding N images to a corpus embeds N images, and a
second data set that shares images with the first reuses them.

The data sets' stores (`raylt.embed.store`) stay as they are, row-aligned and checksummed: the
cache only decides which rows must go through the encoder. A hashing pass (CPU tasks that read
and hash, no decoding) finds the pending rows whose image is known, and the driver puts them
into the store from the cache; only the rest are decoded and encoded, and the decode tasks hash
what they read, so that the driver appends the new embeddings. Each append is a new file written atomically under the
cache's lock, so a crash leaves the cache as it was, and two writers never clash.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylt.embed.store import STORE_FORMAT, atomic_write_table
from raylt.ops.hashing import json_key
from raylt.ops.locks import file_lock

log = logging.getLogger(__name__)


def as_hashes(a) -> np.ndarray:
    """Content hashes as a contiguous S32 array (sortable, searchable), from S32 or from the
    uint8 [N, 32] rows the decode tasks hand over."""
    a = np.ascontiguousarray(a)
    return a if a.dtype == np.dtype("S32") else a.astype(np.uint8, copy=False).view("S32").reshape(-1)


class ImageCache:
    def __init__(self, root: Path, identity: dict, precision: str):
        self.path = Path(root) / "images" / json_key({"backbone": identity, "precision": precision,
                                                      "store_format": STORE_FORMAT})
        self._files: list[Path] = []
        self._index: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # sorted hashes, file, row
        self._open: dict[int, np.ndarray] = {}  # file number -> its embeddings, while a run reads them

    def _load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._index is None:
            self._files = sorted(self.path.glob("part-*.parquet"))
            hashes, files, rows = [np.zeros(0, "S32")], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
            for k, f in enumerate(self._files):
                try:
                    col = pq.read_table(f, columns=["hash"])["hash"].combine_chunks()
                except (OSError, pa.ArrowException):  # files are published whole: this one was damaged since
                    log.warning("image cache file %s cannot be read and is removed: its images are embedded again", f)
                    f.unlink(missing_ok=True)
                    continue
                hashes.append(np.frombuffer(col.buffers()[1], dtype="S32", count=len(col)))
                files.append(np.full(len(col), k, np.int64))
                rows.append(np.arange(len(col), dtype=np.int64))
            h, f, r = (np.concatenate(a) for a in (hashes, files, rows))
            order = np.argsort(h, kind="stable")
            self._index = (h[order], f[order], r[order])
        return self._index

    def known(self) -> np.ndarray:
        """The sorted content hashes of every cached image (what the decode tasks look up)."""
        return self._load()[0]

    def get(self, hashes: np.ndarray) -> np.ndarray:
        """The embeddings of `hashes`, every one of them cached ([N, D] float32)."""
        known, files, rows = self._load()
        hashes = as_hashes(hashes)
        at = np.searchsorted(known, hashes)
        if len(hashes) and (at.max() >= len(known) or not np.array_equal(known[at], hashes)):
            raise KeyError("an image the decode tasks found in the image cache is not in it")
        out = None
        for k in np.unique(files[at]):
            if k not in self._open:
                col = pq.read_table(self._files[k], columns=["embedding"])["embedding"].combine_chunks()
                self._open[k] = col.values.to_numpy().reshape(len(col), -1)
            mine = files[at] == k
            emb = self._open[k][rows[at][mine]]
            if out is None:
                out = np.empty((len(hashes), emb.shape[1]), np.float32)
            out[mine] = emb
        return out if out is not None else np.zeros((0, 0), np.float32)

    def append(self, hashes: np.ndarray, emb: np.ndarray) -> None:
        """Add the embeddings of images not cached yet (one new file, written atomically)."""
        hashes = as_hashes(hashes)
        if not len(hashes):
            return
        hashes, first = np.unique(hashes, return_index=True)  # an image twice in one data set: once
        emb = np.ascontiguousarray(emb[first], dtype=np.float32)
        table = pa.table({
            "hash": pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), len(hashes), [None, pa.py_buffer(hashes)]),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
        })
        self.path.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path / ".lock", f"image cache {self.path}", wait=True):
            atomic_write_table(table, self.path / f"part-{uuid.uuid4().hex}.parquet")
        self._index = None
        self._open.clear()
