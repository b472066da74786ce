"""Moments of aligned blocks of embedding files, kept by content, so that the class statistics
of a grown store read only what changed.

A store's files are fixed row ranges of its source, in order (raylt.embed.store). When a corpus
grows by appending (new tar shards, new Parquet files, new lines at the end of a split file),
the grown store's first files are byte for byte the old store's (the image cache supplies the
same vectors), and only the old last file, if it was partial, and the new files differ. The
Ray reduce (raylt.latent.stats_ray) forms the moments as the merge from the right of aligned
power-of-two blocks of files (`raylt.latent.stats.aligned_blocks`), each a perfect pairwise
tree of merges. A block's moments are kept in `<dir>/<key>.npz`, the key covering the SHA-256
of each of its files, the split, the number of classes, the rank, the transform and the
algorithm's settings; a later reduce whose first blocks are kept loads them and computes only
the others. The tree of merges is the same as a full recompute's, so the moments are equal to
it, value for value: the roots' rank truncation depends on the order of merges (Chan et al.
merge counts, means and scatter exactly; a rank-r root of a merged scatter does not), and
that order does not change.

An insertion in the middle of a source (a new file name that sorts between old ones) moves
every later row, so only the blocks before it are reused. Disk: at most one block per binary
digit of the file count, each the size of the class statistics (C x rank x D float64); the
folder is a cache and may be deleted at any time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from raylt.latent.stats import ALGORITHM, DAMAGED, ClassMoments, load_moments, save_moments
from raylt.ops.hashing import json_key

log = logging.getLogger(__name__)


@dataclass
class BlockCache:
    """The kept moments of blocks [lo, hi) of one list of files (`file_keys`: each file's
    content identity, such as a store's SHA-256), for one split, class count, rank and transform.

    `last_final`: the last file will not change when the data grows (it holds a full shard);
    a block with a partial last file is not kept, since the next growth rewrites that file.
    """

    path: Path
    file_keys: tuple[str, ...]
    context: dict
    class_names: tuple[str, ...]
    last_final: bool = True
    reused_files: int = field(default=0, init=False)  # files whose moments were loaded, not read

    def _file(self, lo: int, hi: int) -> Path:
        key = json_key({**self.context, "algorithm": ALGORITHM, "files": list(self.file_keys[lo:hi])}, 24)
        return self.path / f"block-{key}.npz"

    def present(self) -> frozenset[tuple[int, int]]:
        """(lo, hi) of every aligned power-of-two block of the files that is kept."""
        names = {p.name for p in self.path.glob("block-*.npz")} if self.path.is_dir() else set()
        out, size, n = set(), 1, len(self.file_keys)
        while names and size <= n:
            out |= {(lo, lo + size) for lo in range(0, n - size + 1, size) if self._file(lo, lo + size).name in names}
            size *= 2
        return frozenset(out)

    def load(self, lo: int, hi: int) -> ClassMoments | None:
        f = self._file(lo, hi)
        if not f.is_file():
            return None
        try:
            moments = load_moments(f)[0]
        except DAMAGED as e:
            log.warning("kept moments %s are damaged (%s: %s): their files are read again", f, type(e).__name__, e)
            f.unlink(missing_ok=True)
            return None
        self.reused_files += hi - lo
        return moments

    def keeps(self, lo: int, hi: int) -> bool:
        return hi < len(self.file_keys) or self.last_final

    def save(self, lo: int, hi: int, moments: ClassMoments) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        save_moments(moments, self._file(lo, hi), self.class_names)
