"""Every registry whose choice a config key names, declared in one place: its names, what each
does, and the module that defines them (raylt.registry). `raylt list` shows them, and a
config's names are checked against them before any expensive work (`check_names`), without
importing torch, Ray or MLflow: a misspelt name costs a fraction of a second.

Registries chosen elsewhere than in a config (prediction inputs, search-space distributions)
are checked where they are used.
"""

from __future__ import annotations

from raylt.config import RayltConfig
from raylt.registry import Registry

BACKBONES = Registry("backbone", {
    "pixels": "raw down-sampled pixels; no weights (demo, tests)",
    "open_clip": "any open_clip model: name + pretrained tag, checkpoint file, or local-dir:",
}, home="raylt.embed.backbones")
SOURCES = Registry("data source", {
    "cifar100": "CIFAR-100 python pickles, long-tailed (CIFAR-100-LT)",
    "demo": "built-in handwritten digits (scikit-learn), long-tailed; no download",
    "folder": "class-per-folder image trees (ImageFolder layout)",
    "inat": "iNaturalist 2018/2021 COCO-style annotation JSON, one file per split",
    "parquet_images": "Parquet files of encoded images: image-bytes, label, optional id and split columns",
    "split_file": "Places-LT / ImageNet-LT split files: `path label` per line",
    "webdataset": "WebDataset tar shards: image + label members per sample, brace patterns",
}, home="raylt.data")
SAMPLERS = Registry("sampler", {
    "none": "real embeddings only",
    "gaussian": "calibrated class Gaussians, shrunk toward nearest classes (default)",
    "free_lunch": "Tukey-transformed, nearest base-class statistics (Yang et al. 2021)",
}, home="raylt.latent.sampling")
HEADS = Registry("head", {
    "linear": "affine layer W x + b",
    "whitened": "affine layer trained on embeddings whitened by the pooled within-class covariance, saved as "
                "W x + b (default: bench/head_fit.py)",
    "cosine": "cosine similarity to class weights times head.scale",
}, home="raylt.head.modules")
LOSSES = Registry("loss", {
    "ce": "cross-entropy",
    "logit_adjusted": "cross-entropy on logits + tau log prior (Menon et al. 2021)",
    "balanced_softmax": "cross-entropy on logits + log class count (Ren et al. 2020)",
}, home="raylt.head.modules")
ADJUSTMENTS = Registry("post-hoc adjustment", {
    "none": "the head's own logits",
    "count": "bias + tau / n_c: the margin a mean of n_c images loses (default)",
    "prior": "bias - tau log(n_c / N): post-hoc logit adjustment (Menon et al. 2021)",
}, home="raylt.head.posthoc")
SELECTORS = Registry("selector", {
    "none": "keep every real embedding",
    "random_cap": "at most k uniformly random embeddings per class (the control)",
    "ip_dpp": "at most k per class by a quality-weighted DPP, greedy MAP (arXiv 2510.08836)",
}, home="raylt.methods.selection")
ADAPTERS = Registry("adapter", {
    "none": "the frozen embeddings as they are",
    "bns": "residual MLP, balanced-negative contrastive loss (arXiv 2510.08836)",
}, home="raylt.methods.bns")
BATCHES = Registry("adapter batch sampler", {
    "instance": "rows drawn as they come (one pass per epoch); negatives balanced in the loss",
    "balanced": "classes drawn uniformly, per_class rows each (tail rows repeat often)",
}, home="raylt.methods.bns")
TEMPLATES = Registry("text template set", {
    "simple": "open_clip's 7 SIMPLE_IMAGENET_TEMPLATES (default)",
    "openai": "open_clip's 80 OPENAI_IMAGENET_TEMPLATES (CLIP's ImageNet prompts)",
    "scenes": "8 prompts for place names (Places-style data)",
    "species": "6 prompts for organism names (iNaturalist-style data)",
}, home="raylt.embed.class_text")
MATCHERS = Registry("auxiliary matcher", {
    "text": "cosine of CLIP text embeddings of the class names (the backbone's text tower)",
    "mean": "cosine of the classes' mean image embeddings (no text tower needed)",
}, home="raylt.methods.auxiliary")

# (what `raylt list` calls it, the config key that names the choice, the registry)
CHOICES: tuple[tuple[str, str, Registry], ...] = (
    ("backbones", "backbone.name", BACKBONES),
    ("data sources", "data.source", SOURCES),
    ("samplers", "sampler.name", SAMPLERS),
    ("heads", "head.name", HEADS),
    ("losses", "head.loss", LOSSES),
    ("post-hoc adjustments", "head.posthoc", ADJUSTMENTS),
    ("selectors", "selection.name", SELECTORS),
    ("adapters", "adapter.name", ADAPTERS),
    ("adapter batches", "adapter.batches", BATCHES),
    ("auxiliary matchers", "auxiliary.match", MATCHERS),
)

# What `raylt list` shows: the above, and the template sets, whose key also takes a file.
LISTED = (*CHOICES, ("text template sets (or a file of templates)", "head.text_templates", TEMPLATES))


def chosen(cfg: RayltConfig, key: str) -> str:
    section, field = key.split(".")
    return getattr(getattr(cfg, section), field)


def check_names(cfg: RayltConfig) -> None:
    """Every registry name in the config exists; an unknown one fails here, naming the choices."""
    for _, key, registry in CHOICES:
        registry.check(chosen(cfg, key))
    from raylt.embed.class_text import check_templates  # it registers into TEMPLATES above: an import cycle

    check_templates(cfg.head.text_templates)
