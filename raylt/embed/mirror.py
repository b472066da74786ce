"""A store root on object storage (`store.root: s3://bucket/prefix`), through a local working copy.

The store's guarantees rest on a local file system: shards published by atomic rename, one
writer at a time by `flock`, resume from the markers on disk; object stores offer none of
these (no rename, no lock). So a run works in a local copy of the root,
`<store.staging>/<key of the URI>/`, laid out as the root is, and the object store is the place
stores are shared through:

- before a run, `pull` brings what the object store has and the copy lacks: the recipes (which
  store a config's recipe made), the image cache's files, and the store of this run's data set;
- the run reads and writes the copy as it would a local root (verify, embed, resume, lock);
- after it, `push` uploads what the run wrote: the store's shards and markers first and its
  manifest last, so a reader elsewhere sees a store either complete or absent; then the image
  cache's new files and the recipe.

An object appears whole or not at all once its upload completes, so no reader sees half a
file. `raylt fit --embeddings s3://.../<store>` pulls the store into the copy; the manifest's
checksums are verified there before anything reads it. Two machines writing one store write
the same bytes (the store is keyed by everything that changes them), so their pushes agree.
The class statistics' kept blocks stay in the local copy.

Credentials come from the environment and are never logged (raylt.ops.storage).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from raylt.config import expand_path
from raylt.embed.store import MANIFEST, RECIPES
from raylt.errors import DataError
from raylt.ops.hashing import json_key
from raylt.ops.storage import is_uri, resolve

log = logging.getLogger(__name__)
_CHUNK = 1 << 22


class Mirror:
    """The local working copy of the object-storage root `uri`, under `staging`."""

    def __init__(self, uri: str, staging: str):
        self.uri = uri.rstrip("/")
        self.fs, self.base = resolve(self.uri)
        self.local = expand_path(staging) / json_key({"root": self.uri})
        self.local.mkdir(parents=True, exist_ok=True)
        self._seen: dict[str, tuple[int, int]] = {}  # relative name -> (size, mtime_ns) as pulled or pushed

    def _remote(self, rel: str) -> dict[str, int]:
        """{name relative to the root: size} of the objects under `rel`."""
        from pyarrow import fs

        base = f"{self.base}/{rel}"
        infos = self.fs.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
        return {f"{rel}/{i.path[len(base) + 1:]}": i.size for i in infos if i.type == fs.FileType.File}

    def _stamp(self, rel: str) -> None:
        st = (self.local / rel).stat()
        self._seen[rel] = (st.st_size, st.st_mtime_ns)

    def _failed(self, doing: str, rel: str, e: OSError) -> DataError:
        return DataError(f"cannot {doing} {self.uri}/{rel} ({str(e).splitlines()[0][:200]}); check that the bucket "
                         "exists and that the credentials in the environment may read and write it")

    def pull(self, rel: str) -> int:
        """Download the objects under `rel` that the copy lacks or holds at another size; the
        number downloaded."""
        try:
            return self._pull(rel)
        except OSError as e:
            raise self._failed("read", rel, e) from None

    def push(self, rel: str, last: tuple[str, ...] = ()) -> int:
        """Upload the files under `rel` written since they were pulled (or absent from the object
        store), those named in `last` after all others; the number uploaded."""
        try:
            return self._push(rel, last)
        except OSError as e:
            raise self._failed("write", rel, e) from None

    def _pull(self, rel: str) -> int:
        n = 0
        for name, size in sorted(self._remote(rel).items()):
            dest = self.local / name
            if not (dest.is_file() and dest.stat().st_size == size):
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
                with self.fs.open_input_stream(f"{self.base}/{name}") as src, open(tmp, "wb") as out:
                    while chunk := src.read(_CHUNK):
                        out.write(chunk)
                os.replace(tmp, dest)  # a crash mid-download leaves no file that looks whole
                n += 1
            self._stamp(name)
        if n:
            log.info("%d file(s) of %s/%s copied to %s", n, self.uri, rel, self.local / rel)
        return n

    def _push(self, rel: str, last: tuple[str, ...]) -> int:
        folder = self.local / rel
        if not folder.is_dir():
            return 0
        remote = self._remote(rel)
        names = []
        for p in sorted(folder.rglob("*")):
            if not p.is_file() or p.name.startswith("."):  # locks and half-written files stay local
                continue
            name = p.relative_to(self.local).as_posix()
            st = p.stat()
            if self._seen.get(name) != (st.st_size, st.st_mtime_ns) or remote.get(name) != st.st_size:
                names.append(name)
        names.sort(key=lambda n: Path(n).name in last)
        for name in names:
            with open(self.local / name, "rb") as src, self.fs.open_output_stream(f"{self.base}/{name}") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
            self._stamp(name)
        if names:
            log.info("%d file(s) of %s copied to %s/%s", len(names), self.local / rel, self.uri, rel)
        return len(names)


    def publish(self, store: Path, *more: Path) -> None:
        """Upload a finished store (its manifest last: a reader elsewhere sees it complete or
        not at all), then the other folders (`more`, such as the image cache's) and the recipes."""
        self.push(store.name, last=(MANIFEST,))
        for folder in more:
            self.push(folder.relative_to(self.local).as_posix())
        self.push(RECIPES)


@functools.lru_cache(maxsize=None)
def _mirror(uri: str, staging: str) -> Mirror:
    # One per root and process: what it pulled is not uploaded again by a later call.
    return Mirror(uri, staging)


def working_root(root: str, staging: str) -> tuple[Path, Mirror | None]:
    """The local folder a run reads and writes as the store root, and the mirror that links
    it to object storage (None for a local root)."""
    if not is_uri(root):
        return expand_path(root), None
    mirror = _mirror(root, staging)
    return mirror.local, mirror


def store_location(root: str, store: Path) -> str:
    """Where a store is for the user: its URI when the root is on object storage."""
    return f"{root.rstrip('/')}/{store.name}" if is_uri(root) else str(store)


def pulled_store(uri: str, staging: str) -> Path:
    """A finished store on object storage (`<root URI>/<fingerprint>`), in the local copy."""
    root, _, name = uri.rstrip("/").rpartition("/")
    mirror = _mirror(root, staging)
    mirror.pull(name)
    if not (mirror.local / name / MANIFEST).is_file():
        raise DataError(f"{uri} holds no embedding store (no {MANIFEST}); pass the URI of a store folder, "
                        "<store.root>/<fingerprint>, as `raylt embed` prints it")
    return mirror.local / name
