"""Advisory file locks between runs: one writer per embedding store, one run per output folder.

`fcntl.flock` locks belong to the open file: the kernel (or the NFSv4 / Lustre server) drops
them when the process dies, however it dies, so a killed run never leaves a stale lock. The
lock file holds who took it (host, pid, time) for the message a waiting or refused run prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from raylt.errors import RayltError

log = logging.getLogger(__name__)


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def file_lock(path: Path, what: str, wait: bool, hint: str = "") -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed). `wait`: block until it is free,
    saying once who holds it; otherwise refuse at once with a one-line error naming `what`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise RayltError(f"{what} is in use by {_holder(path)}; {hint or 'wait for that run to end'}") from None
            log.info("%s is in use by %s: waiting for it", what, _holder(path))
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"run pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
