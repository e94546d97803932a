"""The slimmable family: universally slimmable MobileNetV1 / V2, width the only dimension
(``configs/search_spaces/slimmable_mbv{1,2}.yaml``).  A space mapping with a ``family`` key and an arch mapping
with a ``width`` key are this family's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.config import ModelConfig
from models.families import Family, register
from models.slimmable.cost import slimmable_cost
from models.slimmable.space import SlimmableSpace, WidthArch
from models.slimmable.supernet import SlimmableSupernet, build_slimmable_subnet


@register
class SlimmableFamily(Family):
    name = "slimmable"

    def owns_space_dict(self, data: Any) -> bool:
        return isinstance(data, dict) and "family" in data

    def owns_arch_dict(self, data: Any) -> bool:
        return isinstance(data, dict) and "width" in data

    def space_from_dict(self, data: dict[str, Any], *, source: str | Path | None = None) -> SlimmableSpace:
        return SlimmableSpace.from_dict(data, source=source)

    def arch_from_dict(self, data: dict[str, Any], *, source: str | Path | None = None) -> WidthArch:
        return WidthArch.from_dict(data, source=source)

    def build_supernet(self, space: SlimmableSpace, config: ModelConfig) -> SlimmableSupernet:
        return SlimmableSupernet(space, config)

    def build_subnet(
        self, space: SlimmableSpace, arch: WidthArch, num_classes: int, dropout: float
    ) -> SlimmableSupernet:
        return build_slimmable_subnet(space, arch, num_classes, dropout)

    def extract_subnet(self, supernet: SlimmableSupernet, arch: WidthArch | None) -> SlimmableSupernet:
        return supernet.extract(arch)

    def cost(self, space: SlimmableSpace, arch: WidthArch, num_classes: int) -> tuple[int, int]:
        return slimmable_cost(space, arch, num_classes)

    def table_archs(self, space: SlimmableSpace) -> dict[str, WidthArch]:
        """Every width on the grid at the largest resolution, named ``0.35x`` … ``1x`` (AlphaNet Table 1)."""
        resolution = max(space.resolutions)
        return {f"{w:g}x": WidthArch(resolution=resolution, width=w) for w in space.widths}
