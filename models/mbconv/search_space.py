"""The MBConv search space: which sub-networks exist and how they are described (sampled, mutated and crossed
by :class:`models.sampler.ArchSampler` through :meth:`SearchSpace.choices` and :meth:`ArchConfig.with_genes`).

A search space is described in YAML (``configs/search_spaces/*.yaml``) so that the AlphaNet space of
the paper (Table 7) and a tiny CPU space run through the same code.  A sub-network is an
:class:`ArchConfig`: one resolution, one width per stem/stage/head, and per stage a depth, a kernel
size and an expansion ratio shared by all its blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from models.limits import check_resolutions
from typedconfig import from_mapping, load_yaml, to_mapping


def _check_choices(name: str, values: tuple[int, ...], *, positive: bool = True) -> None:
    if not values:
        raise ValueError(f"{name}: needs at least one choice")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}: duplicate choices {list(values)}")
    if list(values) != sorted(values):
        raise ValueError(f"{name}: choices must be sorted ascending, got {list(values)}")
    if positive and values[0] <= 0:
        raise ValueError(f"{name}: choices must be positive, got {list(values)}")


@dataclass(kw_only=True, slots=True, frozen=True)
class StemSpace:
    """The first plain convolution (conv + BN + activation)."""

    widths: tuple[int, ...]
    """Output channel choices."""
    kernel: int = 3
    """Kernel size (odd)."""
    stride: int = 2
    """Spatial stride."""

    def __post_init__(self) -> None:
        _check_choices("stem.widths", self.widths)
        if self.kernel % 2 != 1:
            raise ValueError(f"stem.kernel must be odd, got {self.kernel}")
        if self.stride not in (1, 2):
            raise ValueError(f"stem.stride must be 1 or 2, got {self.stride}")


@dataclass(kw_only=True, slots=True, frozen=True)
class StageSpace:
    """One block group of inverted-residual (MBConv) blocks sharing kernel size and expansion."""

    name: str
    """Display name, e.g. ``mb3``."""
    widths: tuple[int, ...]
    """Output channel choices of every block in the stage."""
    depths: tuple[int, ...]
    """Number-of-blocks choices; a stage of depth d runs its first d blocks."""
    kernels: tuple[int, ...]
    """Depthwise kernel size choices (odd); a smaller kernel is the centre of the largest."""
    expands: tuple[int, ...]
    """Expansion ratio choices; ratio 1 means no 1×1 expansion convolution."""
    stride: int
    """Stride of the stage's first block."""
    se: bool = False
    """Squeeze-and-excitation in every block of the stage."""

    def __post_init__(self) -> None:
        _check_choices(f"{self.name}.widths", self.widths)
        _check_choices(f"{self.name}.depths", self.depths)
        _check_choices(f"{self.name}.kernels", self.kernels)
        _check_choices(f"{self.name}.expands", self.expands)
        if any(k % 2 != 1 for k in self.kernels):
            raise ValueError(f"{self.name}.kernels must be odd, got {list(self.kernels)}")
        if self.stride not in (1, 2):
            raise ValueError(f"{self.name}.stride must be 1 or 2, got {self.stride}")


@dataclass(kw_only=True, slots=True, frozen=True)
class HeadSpace:
    """MBPool head: 1×1 expand to ``expand × C(last stage)`` + BN + act, pool, 1×1 conv to width + act."""

    widths: tuple[int, ...]
    """Channel choices of the feature-mix 1×1 convolution before the classifier."""
    expand: int = 6
    """Multiplier of the last stage's width for the final expansion layer."""

    def __post_init__(self) -> None:
        _check_choices("head.widths", self.widths)
        if self.expand < 1:
            raise ValueError(f"head.expand must be >= 1, got {self.expand}")


@dataclass(kw_only=True, slots=True, frozen=True)
class SearchSpace:
    """A whole supernet search space."""

    family_name: ClassVar[str] = "mbconv"
    name: str
    """Identifier, written into checkpoints and exports."""
    stem: StemSpace
    stages: tuple[StageSpace, ...]
    head: HeadSpace
    resolutions: tuple[int, ...]
    """Input resolution choices; each must be divisible by the space's total stride."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: duplicate stage names {names}")
        _check_choices("resolutions", self.resolutions)
        check_resolutions(self.resolutions)
        bad = [r for r in self.resolutions if r % self.total_stride]
        if bad:
            raise ValueError(
                f"resolutions {bad} are not divisible by the total stride {self.total_stride} of the space"
            )

    @property
    def total_stride(self) -> int:
        return self.stem.stride * math.prod(s.stride for s in self.stages)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def choices(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every gene of an ArchConfig with its choices, in a fixed order (used by sampling)."""
        genes: list[tuple[str, tuple[int, ...]]] = [("resolution", self.resolutions)]
        genes.append(("widths.0", self.stem.widths))
        genes += [(f"widths.{i + 1}", s.widths) for i, s in enumerate(self.stages)]
        genes.append((f"widths.{len(self.stages) + 1}", self.head.widths))
        genes += [(f"depths.{i}", s.depths) for i, s in enumerate(self.stages)]
        genes += [(f"kernels.{i}", s.kernels) for i, s in enumerate(self.stages)]
        genes += [(f"expands.{i}", s.expands) for i, s in enumerate(self.stages)]
        return genes

    def _extreme(self, pick) -> ArchConfig:
        return ArchConfig(
            resolution=pick(self.resolutions),
            widths=(pick(self.stem.widths), *(pick(s.widths) for s in self.stages), pick(self.head.widths)),
            depths=tuple(pick(s.depths) for s in self.stages),
            kernels=tuple(pick(s.kernels) for s in self.stages),
            expands=tuple(pick(s.expands) for s in self.stages),
        )

    def largest(self) -> ArchConfig:
        """Every choice at its maximum (the sandwich rule's teacher)."""
        return self._extreme(max)

    def smallest(self) -> ArchConfig:
        """Every choice at its minimum."""
        return self._extreme(min)

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | Path | None = None) -> SearchSpace:
        return from_mapping(cls, data, source=source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchSpace:
        return cls.from_dict(load_yaml(path), source=path)

    def arch_from_dict(self, data: dict[str, Any], *, source: str | Path | None = None) -> ArchConfig:
        return ArchConfig.from_dict(data, source=source)


@dataclass(frozen=True, kw_only=True, slots=True)
class ArchConfig:
    """One sub-network of a search space."""

    resolution: int
    """Input resolution (square)."""
    widths: tuple[int, ...]
    """Channels of: stem, every stage, head (feature-mix layer)."""
    depths: tuple[int, ...]
    """Blocks per stage."""
    kernels: tuple[int, ...]
    """Depthwise kernel size per stage."""
    expands: tuple[int, ...]
    """Expansion ratio per stage."""

    def __post_init__(self) -> None:
        for name in ("widths", "depths", "kernels", "expands"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "resolution", int(self.resolution))
        n = len(self.depths)
        if len(self.kernels) != n or len(self.expands) != n or len(self.widths) != n + 2:
            raise ValueError(
                "inconsistent lengths: need widths = stages + 2 and depths/kernels/expands = stages, got "
                f"widths={len(self.widths)} depths={n} kernels={len(self.kernels)} expands={len(self.expands)}"
            )

    @property
    def stem_width(self) -> int:
        """Output channels of the stem."""
        return self.widths[0]

    @property
    def stage_widths(self) -> tuple[int, ...]:
        """Output channels of every stage."""
        return self.widths[1:-1]

    @property
    def head_width(self) -> int:
        """Channels of the head's feature-mix layer."""
        return self.widths[-1]

    def problems(self, space: SearchSpace) -> list[str]:
        """Every way this arch falls outside ``space`` (empty when valid)."""
        if len(self.depths) != space.num_stages:
            return [f"has {len(self.depths)} stages, the space '{space.name}' has {space.num_stages}"]
        out = []
        if self.resolution not in space.resolutions:
            out.append(f"resolution {self.resolution} not in {list(space.resolutions)}")
        width_choices = [space.stem.widths, *(s.widths for s in space.stages), space.head.widths]
        width_names = ["stem", *(s.name for s in space.stages), "head"]
        for name, w, ch in zip(width_names, self.widths, width_choices):
            if w not in ch:
                out.append(f"{name} width {w} not in {list(ch)}")
        for stage, d, k, e in zip(space.stages, self.depths, self.kernels, self.expands):
            if d not in stage.depths:
                out.append(f"{stage.name} depth {d} not in {list(stage.depths)}")
            if k not in stage.kernels:
                out.append(f"{stage.name} kernel {k} not in {list(stage.kernels)}")
            if e not in stage.expands:
                out.append(f"{stage.name} expand {e} not in {list(stage.expands)}")
        return out

    def validate(self, space: SearchSpace) -> ArchConfig:
        problems = self.problems(space)
        if problems:
            raise ValueError(f"architecture outside search space '{space.name}': " + "; ".join(problems))
        return self

    def get_gene(self, gene: str) -> int:
        if gene == "resolution":
            return self.resolution
        field, idx = gene.split(".")
        return getattr(self, field)[int(idx)]

    def with_genes(self, genes: dict[str, int]) -> ArchConfig:
        """A copy with the named genes (``resolution``, ``widths.3``, ...) replaced."""
        values = self.to_dict()
        for gene, v in genes.items():
            if gene == "resolution":
                values["resolution"] = v
            else:
                field, idx = gene.split(".")
                values[field][int(idx)] = v
        return ArchConfig.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "widths": list(self.widths),
            "depths": list(self.depths),
            "kernels": list(self.kernels),
            "expands": list(self.expands),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | Path | None = None) -> ArchConfig:
        return from_mapping(cls, data, source=source)


__all__ = [
    "ArchConfig",
    "HeadSpace",
    "SearchSpace",
    "StageSpace",
    "StemSpace",
]
