"""Every registry whose choice a config key names, in one list: `raylt list` shows them, and a
config's names are checked against them before any expensive work (`check_names`).

Registries chosen elsewhere than in a config (prediction inputs, search-space distributions)
are checked where they are used.
"""

from __future__ import annotations

from raylt.config import RayltConfig
from raylt.data import SOURCES
from raylt.embed.backbones import BACKBONES
from raylt.head.modules import HEADS, LOSSES
from raylt.head.posthoc import ADJUSTMENTS
from raylt.latent.sampling import SAMPLERS
from raylt.methods.auxiliary import MATCHERS
from raylt.methods.bns import ADAPTERS, BATCHES
from raylt.methods.selection import SELECTORS
from raylt.registry import Registry

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


def chosen(cfg: RayltConfig, key: str) -> str:
    section, field = key.split(".")
    return getattr(getattr(cfg, section), field)


def check_names(cfg: RayltConfig) -> None:
    """Every registry name in the config exists; an unknown one fails here, naming the choices."""
    for _, key, registry in CHOICES:
        registry.get(chosen(cfg, key))
