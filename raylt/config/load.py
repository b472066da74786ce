"""Configuration loading: layered YAML files plus `key=value` overrides, validated into the
frozen dataclasses of raylt.config.schema.

A config file may name other files under `base:` (paths relative to itself); they are merged
first, in order, then the file itself, then the command-line overrides. Every leaf value
remembers which file set it, so an unknown key, a wrong type or a missing required value
(`???`) is reported as one line naming the key and its file. String values may use
`${VAR}` or `${VAR:-default}` from the environment. A config is a file path, or the name of a
config shipped with raylt (`demo`, `places_lt`, `data/demo`: see `raylt list`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from raylt.config.schema import RayltConfig
from raylt.errors import ConfigError

REQUIRED = "???"
CLI = "the command line"
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RayltConfig:
    """Merge the file (and its bases) with `key=value` overrides and validate the result."""
    flat: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        _merge_file(find_config(path), flat, origin, chain=())
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} on {CLI} is not key=value (e.g. embed.batch_size=64)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r} on {CLI} is not a valid YAML value: "
                              f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from None
        _set(flat, origin, key.strip(), value, CLI)
    return _build(RayltConfig, _unflatten(flat), origin, prefix="")


def override(cfg: RayltConfig, values: Mapping[str, Any], source: str) -> RayltConfig:
    """`cfg` with dotted keys set to `values` (a search space's trial, say), validated like a
    file: an unknown key or a wrong type names the key and `source`."""
    flat = dict(_flatten(to_dict(cfg)))
    origin = {k: "the defaults" for k in flat}
    for key, value in values.items():
        _set(flat, origin, key, value, source)
    return _build(RayltConfig, _unflatten(flat), origin, prefix="")


def shipped_configs() -> Path | None:
    """The folder of the configs shipped with raylt: `raylt/configs/` in an installed wheel, the
    checkout's `configs/` in an editable install (pyproject.toml maps one onto the other)."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "configs", package.parent / "configs"):
        if folder.is_dir():
            return folder
    return None


def shipped_names() -> list[str]:
    """Names of the shipped configs (`demo`, `data/places_lt`, ...), as `raylt run NAME` takes them."""
    root = shipped_configs()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")) if root else []


def find_config(path: str | os.PathLike) -> Path:
    """A config file: the path itself when it exists, else a shipped config of that name."""
    p = Path(path).expanduser()
    root = shipped_configs()
    if not p.exists() and not p.is_absolute() and root is not None:
        for cand in (root / p, root / p.with_suffix(".yaml")):
            if cand.is_file():
                return cand
    return p


def _merge_file(path: Path, flat: dict, origin: dict, chain: tuple[Path, ...]) -> None:
    path = path.expanduser().resolve()
    if path in chain:
        raise ConfigError(f"config {path} includes itself through `base:`")
    if not path.is_file():
        where = f" (named in {chain[-1]})" if chain else ""
        raise ConfigError(f"config file {path} does not exist{where}; `raylt list` shows the shipped configs")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config {path}{line} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config {path} must be a mapping of keys, not {type(doc).__name__}")
    bases = doc.pop("base", []) or []
    for base in [bases] if isinstance(bases, str) else bases:
        _merge_file(path.parent / base, flat, origin, chain + (path,))
    for key, value in _flatten(doc):
        _set(flat, origin, key, value, str(path))


def _flatten(d: Mapping, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _set(flat: dict, origin: dict, key: str, value: Any, src: str) -> None:
    if isinstance(value, dict) and value:
        for k, v in _flatten(value, key + "."):
            _set(flat, origin, k, v, src)
        return
    # A scalar replaces a whole sub-tree and vice versa, as in any layered config.
    for k in [k for k in flat if k.startswith(key + ".") or key.startswith(k + ".")]:
        del flat[k]
    flat[key] = value
    origin[key] = src


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


# ----------------------------------------------------------------------------- validation


def _where(origin: Mapping[str, str], key: str) -> str:
    hits = [src for k, src in origin.items() if k == key or k.startswith(key + ".")]
    src = hits[-1] if hits else "the defaults"
    return src if src in (CLI, "the defaults") else f"file {src}"


def _in(origin: Mapping[str, str], key: str) -> str:
    where = _where(origin, key)
    return f"on {where}" if where == CLI else f"in {where}"


def _build(cls, tree: Mapping, origin: Mapping[str, str], prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in tree:
        if key not in names:
            full = prefix + key
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {full!r} {_in(origin, full)}{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):  # declaration order, so the first error is always the same
        if f.name in tree:
            key = prefix + f.name
            kwargs[f.name] = value = _convert(hints[f.name], tree[f.name], key, origin)
            _check_bounds(f.metadata, value, key, origin)
    return cls(**kwargs)


def _check_bounds(meta: Mapping, value, key: str, origin: Mapping[str, str]) -> None:
    """A field's `min` / `max` (raylt.config.schema._min) and `pattern`, in one line each."""
    if value is None or (isinstance(value, str) and "pattern" not in meta):  # `auto` of a number
        return
    low, high, pattern = meta.get("min"), meta.get("max"), meta.get("pattern")
    if low is not None and value < low:
        raise ConfigError(f"config key {key!r} {_in(origin, key)} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"config key {key!r} {_in(origin, key)} must be <= {high:,}, got {value:,}")
    if pattern is not None and not re.fullmatch(pattern, value):
        raise ConfigError(f"config key {key!r} {_in(origin, key)} must be one folder name (letters, digits, . _ + -, "
                          f"not starting with . or containing /), got {value!r}")


def _convert(tp, value, key: str, origin: Mapping[str, str]):
    where = _in(origin, key)
    if isinstance(value, str):
        value = _expand_env(value, key, where)
        if value == REQUIRED:
            raise ConfigError(f"config key {key!r} is required but not set {where}; pass {key}=VALUE")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} {where} must be a mapping, got {value!r}")
        return _build(tp, value, origin, prefix=key + ".")
    origin_tp = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin_tp in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for tp_ in inner[:-1]:  # `auto` | int: the first type that takes the value
            try:
                return _convert(tp_, value, key, origin)
            except ConfigError:
                continue
        return _convert(inner[-1], value, key, origin)
    if origin_tp is Literal:
        if value not in args:
            raise ConfigError(f"config key {key!r} {where} must be one of {list(args)}, got {value!r}")
        return value
    if origin_tp in (collections.abc.Mapping, dict):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} {where} must be a mapping, got {value!r}")
        vtype = args[1] if args else Any
        return types.MappingProxyType(
            {str(k): _convert(vtype, v, f"{key}.{k}", origin) for k, v in value.items()}
        )
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `model: 16` or `pretrained: 2023` are still names
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(
            f"config key {key!r} {where} must be {tp.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _expand_env(value: str, key: str, where: str) -> str:
    def sub(m: re.Match) -> str:
        var, default = m.group(1), m.group(2)
        if var in os.environ:
            return os.environ[var]
        if default is not None:
            return default
        raise ConfigError(
            f"config key {key!r} {where} uses ${{{var}}}, which is not set; export {var} or pass {key}=VALUE"
        )

    return _ENV.sub(sub, value)


# ----------------------------------------------------------------------------- output


def to_dict(cfg) -> dict:
    """Plain nested dict of a config (mappings made plain), for YAML output and MLflow params."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, Mapping):
            v = dict(v)
        out[f.name] = v
    return out


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def expand_path(p: str | None) -> Path | None:
    """A user path made absolute against the current directory (`~` expanded)."""
    return None if p is None else Path(p).expanduser().resolve()
