"""Configuration: layered YAML files plus `key=value` overrides, validated into frozen dataclasses.

A config file may name other files under `base:` (paths relative to itself); they are merged
first, in order, then the file itself, then the command-line overrides. Every leaf value
remembers which file set it, so an unknown key, a wrong type or a missing required value
(`???`) is reported as one line naming the key and its file. String values may use
`${VAR}` or `${VAR:-default}` from the environment.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from raylt.errors import ConfigError

REQUIRED = "???"
CLI = "the command line"
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from (see `raylt list` for the registered sources)."""

    source: str = "demo"  # registry: split_file, folder, cifar100, demo (`raylt list`)
    root: str | None = None  # image root: split-file paths and class folders are relative to it
    split_dir: str | None = None  # folder of split files; relative `splits` resolve against it
    splits: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))  # split -> file / folder
    class_names: str | None = None  # text file, one class per line in label order
    imbalance_ratio: float | None = None  # exponential long-tail profile on train (n_max / n_min)
    max_per_class: int | None = None  # head count of the long-tail profile (default: largest class)
    seed: int = 0  # the long-tail subsample (and the demo's test split)
    max_bad_fraction: float = 0.01  # fail when more images than this are unreadable
    allow_outside_root: bool = False  # let split-file paths leave `root` (`..`, absolute paths)
    image_size: int = 32  # demo data set: side of the rendered digit images
    test_per_class: int | None = None  # demo data set: balanced test images per class


@dataclass(frozen=True)
class BackboneConfig:
    """The frozen image encoder."""

    name: str = "pixels"  # registry: open_clip, pixels
    model: str | None = None  # open_clip architecture (ViT-B-16) or `local-dir:/path`
    pretrained: str | None = None  # open_clip tag (openai), a checkpoint file, or null for random
    image_size: int = 16  # pixels backbone: side of the down-sampled image
    cache_dir: str | None = None  # where open_clip looks for downloaded weights
    offline: bool = False  # never contact the model hub: tags must already be in the cache
    model_config: str | None = None  # extra open_clip model JSON to register (custom architectures)


@dataclass(frozen=True)
class EmbedConfig:
    """How the embedding stage runs on Ray Data."""

    batch_size: int = 128  # images per encoder call
    decode_batch_size: int = 64  # images per CPU decode task batch
    num_actors: int = 0  # encoder actors; 0 = one per GPU, or CPUs - 1 on a CPU-only cluster
    decode_tasks: int = 0  # concurrent CPU decode tasks; 0 = the cluster's CPU count
    cpus_per_actor: float = 1.0  # CPUs Ray reserves per encoder actor
    threads_per_actor: int = 0  # torch threads of a CPU encoder actor; 0 = cluster CPUs / actors
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    shard_size: int = 4096  # rows per Parquet shard; the unit of resume


@dataclass(frozen=True)
class StoreConfig:
    """Where embeddings are kept: one folder per backbone, preprocessing and data set."""

    root: str = "~/.cache/raylt/store"  # content-addressed embedding store


@dataclass(frozen=True)
class RayConfig:
    """Which Ray to use."""

    address: str | None = None  # null: RAY_ADDRESS if set, else a local Ray started here
    num_cpus: int | None = None  # local Ray only
    object_store_memory: int | None = None  # bytes, local Ray only


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow (raylt.tracking)."""

    enabled: bool = True  # false: nothing is logged; outputs still go to the output folder
    uri: str | None = None  # null: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the current directory
    experiment: str | None = None  # null: the config's `name`
    registered_model: str | None = None  # register each fit's model under this name: models:/<name>/<version>


def _min(v: float) -> dict:
    return {"min": v}


@dataclass(frozen=True)
class StatsConfig:
    """Per-class latent statistics (raylt.stats)."""

    rank: int = field(default=16, metadata=_min(1))  # low-rank part kept per class: C x rank x D floats


@dataclass(frozen=True)
class SamplerConfig:
    """Synthetic embeddings (raylt.sampling; `raylt list` shows the samplers)."""

    name: str = "gaussian"  # registry: none, gaussian, free_lunch
    target: int = field(default=200, metadata=_min(0))  # every class topped up to this many per epoch
    kappa: float = field(default=20.0, metadata=_min(0))  # shrinkage lambda_c = n_c / (n_c + kappa)
    neighbours: int = field(default=5, metadata=_min(1))  # nearest classes a covariance borrows from
    eps: float = field(default=0.05, metadata=_min(0))  # ridge, x mean within-class variance (free_lunch: alpha)
    base_min: int = field(default=20, metadata=_min(2))  # free_lunch: base classes have at least this many


@dataclass(frozen=True)
class SelectionConfig:
    """Which real embeddings of large classes the head trains on (raylt.selection)."""

    name: str = "none"  # registry: none, random_cap, ip_dpp
    k: int = field(default=200, metadata=_min(1))  # at most k real embeddings per class
    every: int = field(default=0, metadata=_min(0))  # re-select every N epochs with a new seed; 0: once


@dataclass(frozen=True)
class AdapterConfig:
    """A residual MLP on the frozen embeddings, trained before the head (raylt.adapter)."""

    name: str = "none"  # registry: none, bns
    batches: str = "instance"  # registry: instance (anchors as they come), balanced (classes drawn uniformly)
    hidden: int = field(default=512, metadata=_min(1))
    epochs: int = field(default=5, metadata=_min(1))
    batch_size: int = field(default=256, metadata=_min(2))
    per_class: int = field(default=4, metadata=_min(2))  # balanced batches: rows per class (batch_size / per_class classes)
    lr: float = field(default=1e-4, metadata=_min(0))  # defaults from bench/ablation.py: 1e-3 or 10 epochs over-fit
    temperature: float = field(default=0.1, metadata=_min(1e-6))
    noise: float = field(default=0.3, metadata=_min(0))  # view augmentation: norm of the added Gaussian noise
    drop: float = field(default=0.2, metadata=_min(0))  # view augmentation: fraction of features zeroed


@dataclass(frozen=True)
class AuxiliaryConfig:
    """Look-alike classes from a second labelled corpus, trained with the head and dropped at
    inference (raylt.auxiliary)."""

    embeddings: str | None = None  # Parquet file, folder or store of the auxiliary corpus; null: off
    class_names: str | None = None  # its class names, one per line (else its manifest's)
    match: str = "text"  # registry: text (CLIP text embeddings of the names), mean (class-mean embeddings)
    neighbours: int = field(default=2, metadata=_min(1))  # auxiliary classes per target class
    tail_neighbours: int = field(default=4, metadata=_min(1))  # ... per class with fewer than tail_below images
    tail_below: int = field(default=20, metadata=_min(1))
    synonym: float = 0.9  # similarity at or above which two names are one concept: the auxiliary class is dropped
    per_class: int = field(default=100, metadata=_min(1))  # images kept per auxiliary class


@dataclass(frozen=True)
class HeadConfig:
    """The trained classifier (raylt.heads)."""

    name: str = "linear"  # registry: linear, cosine
    scale: float = field(default=16.0, metadata=_min(0))  # cosine logit scale (and text-init weight norm)
    text_init: bool = False  # start from CLIP text embeddings of "a photo of a {class name}."
    loss: str = "logit_adjusted"  # registry: ce, logit_adjusted, balanced_softmax (default: bench/head_fit.py)
    tau: float = 1.0  # logit_adjusted: weight of the log prior


@dataclass(frozen=True)
class TrainConfig:
    """The Ray Train stage that fits the head."""

    epochs: int = field(default=30, metadata=_min(1))
    batch_size: int = field(default=256, metadata=_min(1))  # real embeddings per step and worker
    lr: float = field(default=1e-2, metadata=_min(0))  # AdamW, cosine schedule
    weight_decay: float = field(default=1e-4, metadata=_min(0))
    num_workers: int = field(default=1, metadata=_min(1))
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = field(default=0.5, metadata=_min(0))  # below 1 so Ray Data keeps a CPU
    threads_per_worker: int = field(default=0, metadata=_min(0))  # torch threads; 0 = node CPUs / workers on it
    # Ray Train's placement of the workers: PACK fills one node first (fast collectives),
    # SPREAD puts them on different nodes (more memory bandwidth and NICs per worker).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Worker failures (a killed process, a lost node) survived by restarting the workers from
    # the last checkpoint; past this many the run fails, and re-running it resumes.
    max_failures: int = field(default=3, metadata=_min(0))
    output_dir: str = "outputs"  # runs write <output_dir>/<name>/: metrics, plot, checkpoints


@dataclass(frozen=True)
class RayltConfig:
    name: str = "raylt"  # the experiment: output folder <train.output_dir>/<name>, MLflow experiment
    seed: int = 0  # head initialisation, shuffling and the synthetic stream
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    auxiliary: AuxiliaryConfig = field(default_factory=AuxiliaryConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RayltConfig:
    """Merge the file (and its bases) with `key=value` overrides and validate the result."""
    flat: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        _merge_file(Path(path), flat, origin, chain=())
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


def _merge_file(path: Path, flat: dict, origin: dict, chain: tuple[Path, ...]) -> None:
    path = path.expanduser().resolve()
    if path in chain:
        raise ConfigError(f"config {path} includes itself through `base:`")
    if not path.is_file():
        where = f" (named in {chain[-1]})" if chain else ""
        raise ConfigError(f"config file {path} does not exist{where}; see configs/ for examples")
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
            low = f.metadata.get("min")
            if low is not None and value is not None and value < low:
                raise ConfigError(f"config key {key!r} {_in(origin, key)} must be >= {low}, got {value!r}")
    return cls(**kwargs)


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
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key, origin)
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
