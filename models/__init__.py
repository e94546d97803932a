"""Supernets, search spaces, standalone sub-networks and their exact cost, for every model family.

Shared code sits here (``ops``, ``depthwise``, ``init``, ``config``, ``sampler``, ``flops``, ``export``); each
family has its own folder (``mbconv/``, ``slimmable/``) and is reached through :mod:`models.families`.
"""

from models.config import ModelConfig
from models.export import load_subnet, save_subnet
from models.families import build_subnet, build_supernet, extract_subnet, load_named_archs, load_search_space
from models.mbconv.search_space import ArchConfig, SearchSpace
from models.mbconv.static import StaticSubnet
from models.mbconv.supernet import AlphaNetSupernet
from models.sampler import ArchSampler
from models.slimmable.space import SlimmableSpace, WidthArch
from models.slimmable.supernet import SlimmableSupernet


def __getattr__(name: str):
    # Lazy, so that ``python -m models.flops`` does not find its own module imported by the package.
    if name in ("Cost", "subnet_cost"):
        from models import flops

        return getattr(flops, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


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
