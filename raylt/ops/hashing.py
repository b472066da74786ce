"""Hashes raylt keys things by: a file's SHA-256, and a short key of a JSON-able value.

`json_key` names the embedding store's folder (its fingerprint), the checkpoints a fit may
resume (raylt.preflight's `fit_key`) and the adapted embeddings it may reuse (`adapter_key`): the same value
always gives the same key, whatever the order of its dictionaries.
"""

from __future__ import annotations

import hashlib
import json
import os


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (checkpoints and shards are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_key(value, length: int = 16) -> str:
    """The first `length` hex digits of the SHA-256 of `value` as sorted-key JSON (anything
    JSON cannot encode, such as a Path, as its string)."""
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
