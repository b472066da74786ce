"""The configuration reference (docs/CONFIG.md), generated from the config dataclasses.

Each key's type, default and lower bound come from its field; its description from the
comment on the field's line, or the comment lines just above it, in raylt/config/schema.py. A test
checks that the checked-in docs/CONFIG.md equals `raylt config --reference`, so the page
cannot drift from the code.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import io
import tokenize
import types
import typing
from typing import Literal, Mapping

from raylt.config.schema import RayltConfig

HEADER = """# Configuration reference

Generated from the config dataclasses in `raylt/config/schema.py` by `raylt config --reference`;
a test fails when this page and the code disagree. How files, `base:` layering, `key=value`
overrides and `${VAR}` work: README, "Configuration". `raylt config CONFIG [key=value ...]`
prints a resolved config.
"""


def field_comments(cls) -> dict[str, str]:
    """Field name -> its comment: the one on its line, else the comment lines just above."""
    source = inspect.getsource(cls)
    comments, pending, out = {}, [], {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    for i, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(comments.get(i, ""))
            continue
        name = stripped.split(":", 1)[0]
        if name in names and ":" in stripped:
            out[name] = comments.get(i) or " ".join(pending)
        pending = []
    return out


def type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args).replace("NoneType", "null")
    if origin in (Mapping, dict, collections.abc.Mapping):
        return "mapping"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
        if isinstance(v, Mapping):
            v = dict(v)
    else:
        return "required"
    return "null" if v is None else f"`{str(v).lower() if isinstance(v, bool) else v}`"


def _table(cls, prefix: str) -> list[str]:
    hints, notes = typing.get_type_hints(cls), field_comments(cls)
    rows = ["| key | type | default | what |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        low, high = f.metadata.get("min"), f.metadata.get("max")
        what = notes.get(f.name, "").replace("|", "\\|")
        bound = (f" ({low:,} to {high:,})" if high is not None else f" (at least {low})") if low is not None else ""
        rows.append(f"| `{prefix}{f.name}` | {type_name(hints[f.name])} | {_default(f)} | {what}{bound} |")
    return rows


def reference() -> str:
    """docs/CONFIG.md."""
    parts = [HEADER, "## Top level", "", *_table(RayltConfig, ""), ""]
    hints = typing.get_type_hints(RayltConfig)
    for f in dataclasses.fields(RayltConfig):
        cls = hints[f.name]
        if not dataclasses.is_dataclass(cls):
            continue
        doc = inspect.getdoc(cls) or ""
        doc = "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split())  # dataclass's generated signature
        parts += [f"## `{f.name}`", ""] + ([doc, ""] if doc else []) + _table(cls, f.name + ".") + [""]
    return "\n".join(parts)
