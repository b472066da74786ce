"""The configuration schema: what every key is, as frozen dataclasses with defaults and bounds.

Each field carries a trailing comment (or comment lines above it): docs/CONFIG.md is generated
from them (raylt.config.reference). Loading and validation are in raylt.config.load.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Literal, Mapping


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from (see `raylt list` for the registered sources)."""

    source: str = "demo"  # registry: split_file, folder, webdataset, parquet_images, inat, cifar100, demo
    root: str | None = None  # image root: split-file paths and class folders are relative to it
    split_dir: str | None = None  # folder of split (or annotation) files; relative `splits` resolve against it
    splits: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))  # split -> file / folder
    class_names: str | None = None  # text file, one class per line in label order
    imbalance_ratio: float | None = None  # exponential long-tail profile on train (n_max / n_min)
    max_per_class: int | None = None  # head count of the long-tail profile (default: largest class)
    seed: int = 0  # the long-tail subsample (and the demo's test split)
    max_bad_fraction: float = 0.01  # fail when more images than this are unreadable
    allow_outside_root: bool = False  # let split-file paths leave `root` (`..`, absolute paths)
    label_key: str = "cls"  # webdataset: the label member's extension: cls (integer), txt (class name), json
    image_column: str = "image"  # parquet_images: encoded image bytes (binary, or a struct with `bytes`)
    label_column: str = "label"  # parquet_images: class index or class name
    id_column: str | None = None  # parquet_images: unique row id (null: file and row number)
    split_column: str | None = None  # parquet_images: each row's split (null: the data.splits key of its file)
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
    decode: Literal["auto", "tasks", "actor"] = "auto"  # where images are decoded: CPU tasks, or the encoder actors (nvJPEG on their GPU); auto: actor on GPU
    shard_size: int = 4096  # rows per Parquet shard; the unit of resume


@dataclass(frozen=True)
class StoreConfig:
    """Where embeddings are kept: one folder per backbone, preprocessing and data set."""

    root: str = "~/.cache/raylt/store"  # content-addressed embedding store: a folder, or s3:// / gs:// (raylt.embed.mirror)
    staging: str = "~/.cache/raylt/staging"  # the local working copy of a root on object storage


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


def _min(v: float, most: float | None = None) -> dict:
    """Bounds of a number: `most` on the values that size arrays or loops, so that a typo
    (`sampler.target=1000000000000`) is a one-line error, not an allocation that fails deep
    inside a worker."""
    return {"min": v, "max": most}


# A run's `name` becomes a folder under train.output_dir and an MLflow experiment: one path part.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"


@dataclass(frozen=True)
class StatsConfig:
    """Per-class latent statistics (raylt.latent.stats)."""

    rank: int = field(default=16, metadata=_min(1, 1024))  # low-rank part kept per class: C x rank x D floats


@dataclass(frozen=True)
class SamplerConfig:
    """Synthetic embeddings (raylt.latent.sampling; `raylt list` shows the samplers)."""

    name: str = "gaussian"  # registry: none, gaussian, free_lunch
    target: int = field(default=100, metadata=_min(0, 1_000_000))  # every class topped up to this many per epoch (default: bench/head_fit.py)
    kappa: float = field(default=20.0, metadata=_min(0))  # shrinkage lambda_c = n_c / (n_c + kappa)
    neighbours: int = field(default=5, metadata=_min(1, 1000))  # nearest classes a covariance borrows from
    eps: float = field(default=0.05, metadata=_min(0))  # ridge, x mean within-class variance (free_lunch: alpha)
    base_min: int = field(default=20, metadata=_min(2))  # free_lunch: base classes have at least this many


@dataclass(frozen=True)
class SelectionConfig:
    """Which real embeddings of large classes the head trains on (raylt.methods.selection)."""

    name: str = "none"  # registry: none, random_cap, ip_dpp
    k: int = field(default=200, metadata=_min(1, 10_000_000))  # at most k real embeddings per class
    every: int = field(default=0, metadata=_min(0))  # re-select every N epochs with a new seed; 0: once


@dataclass(frozen=True)
class AdapterConfig:
    """A residual MLP on the frozen embeddings, trained before the head (raylt.methods.bns)."""

    name: str = "none"  # registry: none, bns
    batches: str = "instance"  # registry: instance (anchors as they come), balanced (classes drawn uniformly)
    hidden: int = field(default=512, metadata=_min(1, 65536))
    epochs: int = field(default=5, metadata=_min(1, 100_000))
    batch_size: int = field(default=256, metadata=_min(2, 1 << 24))
    per_class: int = field(default=4, metadata=_min(2))  # balanced batches: rows per class (batch_size / per_class classes)
    lr: float = field(default=1e-4, metadata=_min(0))  # defaults from bench/ablation.py: 1e-3 or 10 epochs over-fit
    temperature: float = field(default=0.1, metadata=_min(1e-6))
    noise: float = field(default=0.3, metadata=_min(0))  # view augmentation: norm of the added Gaussian noise
    drop: float = field(default=0.2, metadata=_min(0))  # view augmentation: fraction of features zeroed


@dataclass(frozen=True)
class AuxiliaryConfig:
    """Look-alike classes from a second labelled corpus, trained with the head and dropped at
    inference (raylt.methods.auxiliary)."""

    embeddings: str | None = None  # Parquet file, folder or store of the auxiliary corpus; null: off
    class_names: str | None = None  # its class names, one per line (else its manifest's)
    match: str = "text"  # registry: text (CLIP text embeddings of the names), mean (class-mean embeddings)
    neighbours: int = field(default=2, metadata=_min(1, 1000))  # auxiliary classes per target class
    tail_neighbours: int = field(default=4, metadata=_min(1, 1000))  # ... per class with fewer than tail_below images
    tail_below: int = field(default=20, metadata=_min(1))
    synonym: float = 0.9  # similarity at or above which two names are one concept: the auxiliary class is dropped
    per_class: int = field(default=100, metadata=_min(1, 10_000_000))  # images kept per auxiliary class


@dataclass(frozen=True)
class HeadConfig:
    """The trained classifier (raylt.head.modules)."""

    name: str = "whitened"  # registry: whitened, linear, cosine (default: bench/head_fit.py)
    whiten_ridge: float = field(default=0.01, metadata=_min(0))  # whitened: least shrinkage of the pooled covariance toward its mean eigenvalue (OAS when larger)
    scale: float = field(default=16.0, metadata=_min(0))  # cosine logit scale (and text-init weight norm)
    text_init: bool = False  # start from CLIP text embeddings of "a photo of a {class name}."
    # With class text (a backbone with a text tower): the sampler's class means shrunk toward
    # means predicted from the names' text, each by a weight estimated from the data (raylt.head.text)
    text_prior: bool = True
    # With class text: zero-shot CLIP's logits added with a weight chosen on the val rows,
    # folded into the served W x + b (a linear head without an adapter)
    text_ensemble: bool = True
    # Prompts of the class text: simple (open_clip's 7 SIMPLE_IMAGENET_TEMPLATES; 80 openai ones
    # cost 11x the text tower's time on CPU), openai, scenes, species, or a file of templates
    # (one per line, {} where the name goes)
    text_templates: str = "simple"
    loss: str = "logit_adjusted"  # registry: ce, logit_adjusted, balanced_softmax (default: bench/head_fit.py)
    tau: float = 1.0  # logit_adjusted: weight of the log prior
    posthoc: str = "count"  # registry: none, count, prior: per-class offsets tau f(n_c) added to the bias after training
    # null: tau chosen on the val split's balanced accuracy (0 without a val split apart from the evaluation split)
    posthoc_tau: float | None = None
    calibrate: bool = True  # divide the logits by a temperature fitted on the val split (probabilities only; top-1 unchanged)
    # Without a val split: the share of each train class (of 5+ images) held out, with the seed,
    # to choose the post-hoc tau, the temperature and the ensemble weight on a fit of the rest;
    # the head is then refitted on the whole train split. 0: those stay off without a val split.
    holdout: float = field(default=0.2, metadata=_min(0, 0.5))


@dataclass(frozen=True)
class TrainConfig:
    """The Ray Train stage that fits the head."""

    # Defaults from bench/head_fit.py: the whitened head converges in 4 epochs of 1,024-row steps
    # (a fifth adds 0.2-0.4 points of top-1 for a quarter more time).
    epochs: int = field(default=4, metadata=_min(1, 100_000))
    batch_size: int = field(default=1024, metadata=_min(1, 1 << 24))  # real embeddings per step and worker
    lr: float = field(default=0.1, metadata=_min(0))  # AdamW, cosine schedule
    weight_decay: float = field(default=1e-4, metadata=_min(0))
    # The head's matrix products under autocast (raylt.ops.precision); parameters, optimiser
    # and loss stay float32. auto: bf16 where the device multiplies it natively (CUDA, or a
    # CPU with AVX512-BF16 / AMX: twice as fast at the same top-1, bench/head_fit.py), else fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Ray Train workers. auto: Ray Train's local mode on one node (the loop runs in the driver's
    # process, no worker group to start), one worker on a multi-node cluster; 0: local mode;
    # N: a worker group of N with DDP.
    num_workers: Literal["auto"] | int = field(default="auto", metadata=_min(0, 4096))
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
    # The experiment: output folder <train.output_dir>/<name> and MLflow experiment; letters,
    # digits and . _ + - (no path separator, no leading dot), at most 128 characters.
    name: str = field(default="raylt", metadata={"pattern": NAME_PATTERN})
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
