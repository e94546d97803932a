"""The slimmable space: a MobileNet layer table and a grid of width multipliers (``width_range``,
``width_step``); a sub-network is a :class:`WidthArch` (one multiplier, one resolution).  A space file is
recognised by its ``family`` key (``mobilenet_v1`` / ``mobilenet_v2``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from models.limits import check_resolutions
from typedconfig import from_mapping, load_yaml, to_mapping

MobileNet = Literal["mobilenet_v1", "mobilenet_v2"]
"""The layer table's network (a space file's ``family`` key)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class SlimmableSpace:
    """A MobileNet layer table and the width multipliers its sub-networks may take."""

    family_name: ClassVar[str] = "slimmable"
    name: str
    """Identifier, written into checkpoints and exports."""
    family: MobileNet
    """``mobilenet_v1`` (depthwise-separable blocks) or ``mobilenet_v2`` (inverted residuals)."""
    width_range: tuple[float, float]
    """Smallest and largest width multiplier (both on the grid of ``width_step``)."""
    width_step: float = 0.05
    """Spacing of the width grid the sampler, the search and the evaluation table use."""
    resolutions: tuple[int, ...]
    """Input resolution choices (the paper trains slimmable networks at 224 only)."""
    stem: int
    """Output channels of the 3×3 stride-2 stem at width 1.0."""
    layers: tuple[tuple[int, int, int, int], ...]
    """``[expand, channels, repeats, stride]`` per block group at width 1.0 (MobileNetV2's t, c, n, s;
    MobileNetV1 groups use expand 1)."""
    last_channels: int = 0
    """MobileNetV2's final 1×1 conv (1280; not narrowed below width 1.0); 0 for MobileNetV1."""
    divisor: int = 8
    """Channels are rounded to multiples of this (``make_divisible``)."""

    def __post_init__(self) -> None:
        lo, hi = self.width_range
        if not 0 < lo <= hi:
            raise ValueError(f"width_range must be (low, high) with 0 < low <= high, got {list(self.width_range)}")
        if self.width_step <= 0:
            raise ValueError(f"width_step must be positive, got {self.width_step}")
        steps = (hi - lo) / self.width_step
        if abs(steps - round(steps)) > 1e-6:
            raise ValueError(
                f"width_range {list(self.width_range)} is not a whole number of width_step {self.width_step}"
            )
        if not self.layers:
            raise ValueError("layers: needs at least one block group")
        for expand, channels, repeats, stride in self.layers:
            if expand < 1 or channels < 1 or repeats < 1 or stride not in (1, 2):
                raise ValueError(
                    f"layers: bad [expand, channels, repeats, stride] {[expand, channels, repeats, stride]}"
                )
            if self.family == "mobilenet_v1" and expand != 1:
                raise ValueError("layers: mobilenet_v1 blocks have expand 1")
        if self.family == "mobilenet_v1" and self.last_channels:
            raise ValueError("last_channels: mobilenet_v1 has no last 1x1 conv (use 0)")
        if self.family == "mobilenet_v2" and self.last_channels < 1:
            raise ValueError("last_channels: mobilenet_v2 needs its last 1x1 conv width (1280)")
        check_resolutions(self.resolutions)
        if not self.resolutions or any(r % self.total_stride for r in self.resolutions):
            raise ValueError(
                f"resolutions {list(self.resolutions)} must be divisible by the total stride {self.total_stride}"
            )

    @property
    def widths(self) -> tuple[float, ...]:
        lo, hi = self.width_range
        count = round((hi - lo) / self.width_step) + 1
        return tuple(round(lo + i * self.width_step, 4) for i in range(count))

    @property
    def total_stride(self) -> int:
        return 2 * math.prod(stride for *_, stride in self.layers)

    def choices(self) -> list[tuple[str, tuple]]:
        """The genes of a :class:`WidthArch` with their choices (used by sampling, mutation, crossover)."""
        return [("resolution", self.resolutions), ("width", self.widths)]

    def largest(self) -> WidthArch:
        return WidthArch(resolution=max(self.resolutions), width=self.widths[-1])

    def smallest(self) -> WidthArch:
        return WidthArch(resolution=min(self.resolutions), width=self.widths[0])

    def arch_from_dict(self, data: dict[str, Any], *, source: str | Path | None = None) -> WidthArch:
        return WidthArch.from_dict(data, source=source)

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | Path | None = None) -> SlimmableSpace:
        return from_mapping(cls, data, source=source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SlimmableSpace:
        return cls.from_dict(load_yaml(path), source=path)


@dataclass(frozen=True, kw_only=True, slots=True)
class WidthArch:
    """One sub-network of a slimmable space: a width multiplier and an input resolution."""

    resolution: int
    width: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolution", int(self.resolution))
        object.__setattr__(self, "width", round(float(self.width), 4))

    def problems(self, space: SlimmableSpace) -> list[str]:
        out = []
        if self.resolution not in space.resolutions:
            out.append(f"resolution {self.resolution} not in {list(space.resolutions)}")
        if self.width not in space.widths:
            out.append(
                f"width {self.width} not in the grid {space.widths[0]}..{space.widths[-1]} step {space.width_step}"
            )
        return out

    def validate(self, space: SlimmableSpace) -> WidthArch:
        problems = self.problems(space)
        if problems:
            raise ValueError(f"architecture outside search space '{space.name}': " + "; ".join(problems))
        return self

    def get_gene(self, gene: str) -> float:
        return getattr(self, gene)

    def with_genes(self, genes: dict[str, Any]) -> WidthArch:
        return WidthArch(**{**self.to_dict(), **genes})

    def to_dict(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "width": self.width}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | Path | None = None) -> WidthArch:
        return from_mapping(cls, data, source=source)
