"""What a config trains: which long-tail methods are on, the recipe's name, and the plain head
it is measured against.

`is_on` is the one answer to "is this method on?": the pipeline runs a method's stage only
when it is, `fit_key` leaves out the settings of the methods that are off (changing them keeps
a run's checkpoints), and the ablation skips a recipe whose method cannot be turned on.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from raylt.config import RayltConfig

# method (its config section) -> whether a config turns it on
METHODS: dict[str, Callable[[RayltConfig], bool]] = {
    "selection": lambda cfg: cfg.selection.name != "none",
    "adapter": lambda cfg: cfg.adapter.name != "none",
    "auxiliary": lambda cfg: bool(cfg.auxiliary.embeddings),
}


def is_on(cfg: RayltConfig, method: str) -> bool:
    return METHODS[method](cfg)


def recipe_label(cfg: RayltConfig) -> str:
    """A short name of what a config trains: the parts that differ from a plain head."""
    parts = [f"{cfg.sampler.name} sampler", f"{cfg.head.loss} loss"]
    if is_on(cfg, "selection"):
        parts.append(f"{cfg.selection.name} k={cfg.selection.k}")
    if is_on(cfg, "adapter"):
        parts.append(f"{cfg.adapter.name} adapter")
    if is_on(cfg, "auxiliary"):
        parts.append("auxiliary classes")
    return ", ".join(parts)


def baseline_config(cfg: RayltConfig) -> RayltConfig:
    """The plain CE head on all real embeddings only, everything else equal (not registered):
    no sampler, no offsets, no class text."""
    head = dataclasses.replace(cfg.head, loss="ce", posthoc="none", text_init=False, text_prior=False,
                               text_ensemble=False)
    return dataclasses.replace(
        cfg, sampler=dataclasses.replace(cfg.sampler, name="none"), head=head,
        selection=dataclasses.replace(cfg.selection, name="none"), adapter=dataclasses.replace(cfg.adapter, name="none"),
        auxiliary=dataclasses.replace(cfg.auxiliary, embeddings=None),
        tracking=dataclasses.replace(cfg.tracking, registered_model=None),  # a comparison, not a model to serve
    )
