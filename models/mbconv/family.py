"""The MBConv family (AlphaNet / AttentiveNAS): stages of inverted-residual blocks with searchable width,
depth, kernel and expansion (``configs/search_spaces/alphanet.yaml``, ``tiny.yaml``).  Its file format came
first and has no marker key: it reads every space and arch mapping no other family claims."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.config import ModelConfig
from models.families import Family, LatencyPart, register
from models.mbconv.cost import mbconv_cost
from models.mbconv.latency_parts import all_latency_parts, latency_parts
from models.mbconv.search_space import ArchConfig, SearchSpace
from models.mbconv.static import StaticSubnet, extract_static_subnet
from models.mbconv.supernet import AlphaNetSupernet


@register
class MBConvFamily(Family):
    name = "mbconv"
    unmarked = True
    supports_local_sharing = True

    def space_from_dict(self, data: dict[str, Any], *, source: str | Path | None = None) -> SearchSpace:
        return SearchSpace.from_dict(data, source=source)

    def arch_from_dict(self, data: dict[str, Any], *, source: str | Path | None = None) -> ArchConfig:
        return ArchConfig.from_dict(data, source=source)

    def build_supernet(self, space: SearchSpace, config: ModelConfig) -> AlphaNetSupernet:
        return AlphaNetSupernet(space, config)

    def build_subnet(self, space: SearchSpace, arch: ArchConfig, num_classes: int, dropout: float) -> StaticSubnet:
        return StaticSubnet(space, arch, num_classes, dropout)

    def extract_subnet(self, supernet: AlphaNetSupernet, arch: ArchConfig | None) -> StaticSubnet:
        return extract_static_subnet(supernet, arch)

    def cost(self, space: SearchSpace, arch: ArchConfig, num_classes: int) -> tuple[int, int]:
        return mbconv_cost(space, arch, num_classes)

    def latency_parts(self, space: SearchSpace, arch: ArchConfig, num_classes: int) -> list[LatencyPart]:
        return latency_parts(space, arch, num_classes)

    def all_latency_parts(self, space: SearchSpace, num_classes: int) -> list[LatencyPart]:
        return all_latency_parts(space, num_classes)
