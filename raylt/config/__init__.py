"""Configuration: the schema (frozen dataclasses), loading and validation, the reference page.

The names below are the config's public face; `from raylt.config import load_config` is how
the rest of raylt and its users take them.
"""

from raylt.config.load import (
    CLI,
    REQUIRED,
    dump_yaml,
    expand_path,
    find_config,
    load_config,
    override,
    shipped_configs,
    shipped_names,
    to_dict,
)
from raylt.config.schema import (
    AdapterConfig,
    AuxiliaryConfig,
    BackboneConfig,
    DataConfig,
    EmbedConfig,
    HeadConfig,
    RayConfig,
    RayltConfig,
    SamplerConfig,
    SelectionConfig,
    StatsConfig,
    StoreConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "CLI", "REQUIRED", "dump_yaml", "expand_path", "find_config", "load_config", "override", "shipped_configs",
    "shipped_names", "to_dict", "AdapterConfig", "AuxiliaryConfig", "BackboneConfig", "DataConfig", "EmbedConfig",
    "HeadConfig", "RayConfig", "RayltConfig", "SamplerConfig", "SelectionConfig", "StatsConfig", "StoreConfig",
    "TrackingConfig", "TrainConfig",
]
