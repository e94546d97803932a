"""Supernet, search space, standalone sub-networks and their exact cost."""

from models.config import ModelConfig
from models.export import load_subnet, save_subnet
from models.mbconv.search_space import (
    ArchConfig,
    ArchSampler,
    SearchSpace,
    load_named_archs,
    load_search_space,
)
from models.mbconv.static import StaticSubnet, build_subnet, extract_subnet
from models.mbconv.supernet import AlphaNetSupernet
from models.slimmable.supernet import SlimmableSpace, SlimmableSupernet, WidthArch


def __getattr__(name: str):
    # Lazy, so that ``python -m models.flops`` does not import its own module twice.
    if name in ("Cost", "subnet_cost"):
        from models import flops

        return getattr(flops, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


def build_supernet(config: ModelConfig) -> AlphaNetSupernet | SlimmableSupernet:
    """The supernet described by a model config section (a slimmable MobileNet for a slimmable space)."""
    space = load_search_space(config.search_space)
    if isinstance(space, SlimmableSpace):
        return SlimmableSupernet(space, config)
    return AlphaNetSupernet(space, config)


__all__ = [
    "AlphaNetSupernet",
    "ArchConfig",
    "ArchSampler",
    "Cost",
    "ModelConfig",
    "SearchSpace",
    "SlimmableSpace",
    "SlimmableSupernet",
    "StaticSubnet",
    "WidthArch",
    "build_subnet",
    "build_supernet",
    "extract_subnet",
    "load_named_archs",
    "load_search_space",
    "load_subnet",
    "save_subnet",
    "subnet_cost",
]
