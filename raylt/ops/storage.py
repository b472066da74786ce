"""Where data lives: a local path, or an object-storage URI (`s3://bucket/key`, `gs://bucket/key`)
read through pyarrow's file systems, as Ray Data reads them.

Credentials and endpoints come from the usual environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION; GOOGLE_APPLICATION_CREDENTIALS)
and are never logged: messages name the URI, which holds no secret. The driver resolves the
file system once; the decode tasks get it with their arguments (pyarrow's file systems
pickle with their options), as Ray Data hands its tasks the `filesystem` it was given.
"""

from __future__ import annotations

import os

from raylt.config import expand_path
from raylt.errors import DataError

SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://")


def is_uri(location: str) -> bool:
    return str(location).startswith(SCHEMES)


def resolve(location: str):
    """(file system or None for the local disk, the location as that file system names it):
    a URI keeps its `bucket/key` form, a local path becomes absolute."""
    if not is_uri(location):
        return None, str(expand_path(location))
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(str(location))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot open {location} ({str(e).splitlines()[0][:160]}); check the URI and the "
                        "credentials in the environment") from None
    return filesystem, path


def open_input(path: str, filesystem, stream: bool = False):
    """A binary file object: random access, or a sequential stream (one GET for an object)."""
    if filesystem is None:
        return open(path, "rb")
    return filesystem.open_input_stream(path, buffer_size=1 << 22) if stream else filesystem.open_input_file(path)


def size_of(path: str, filesystem) -> int:
    """The size in bytes; FileNotFoundError when there is nothing at `path`."""
    if filesystem is None:
        return os.stat(path).st_size
    from pyarrow import fs

    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        raise FileNotFoundError(path)
    return info.size
