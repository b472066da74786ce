"""Lists of images, one `relative/path.jpg [label]` per line: split files (Places-LT /
ImageNet-LT, label required) and `raylt predict` list files (label optional).

Blank lines and `#` comments are skipped. A path that leaves the root (`..`, absolute) is
refused unless allowed, so a shared list cannot read arbitrary files. Errors name the file and
the line.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from raylt.errors import DataError


def relative_path(rel: str, where: str, allow_outside_root: bool, allow: str) -> str:
    """`rel` normalised; one that leaves the root (`..`, absolute) is refused unless allowed."""
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if not allow_outside_root and (norm.startswith("/") or norm == ".." or norm.startswith("../")):
        raise DataError(f"{where}: path {rel!r} leaves the data root; set {allow} if that is intended")
    return norm


def _label(text: str, where: str) -> int:
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"{where}: label {text!r} is not an integer") from None
    if label < 0:
        raise DataError(f"{where}: label {label} is negative")
    return label


def parse_list(path: Path, label_required: bool, allow_outside_root: bool, allow: str) -> tuple[list[str], list]:
    """(relative paths, labels) of the lines of `path`. Without `label_required`, a line whose
    last word is not a number is all path, and its label is None."""
    paths, labels = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path}:{lineno}"
            parts = line.rsplit(None, 1)
            if label_required:
                if len(parts) != 2:
                    raise DataError(f"{where}: expected '<relative path> <label>', got {line!r}")
                rel, label = parts[0], _label(parts[1], where)
            else:
                labelled = len(parts) == 2 and parts[1].isdigit()
                rel, label = (parts[0], int(parts[1])) if labelled else (line, None)
            paths.append(relative_path(rel, where, allow_outside_root, allow))
            labels.append(label)
    return paths, labels
