"""One description of a sub-network's shape, resolved once from (search space, arch).

The supernet, the standalone extraction and the FLOPs counter all consume a :class:`SubnetPlan`, so the
rules live here only: a stage of depth d runs its first d blocks; the first block of a stage has the
stage's stride, the others stride 1; a block's hidden width is ``expanded_channels(in, expand)``; its
shortcut is the identity when stride is 1 and in == out channels, else an average pool (stride 2) and/or
a 1×1 convolution (channel change); the head expands the last width by ``head.expand``.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.mbconv.search_space import ArchConfig, SearchSpace
from models.ops import expanded_channels


@dataclass(frozen=True, slots=True)
class StemPlan:
    out_channels: int
    kernel: int
    stride: int


@dataclass(frozen=True, slots=True)
class BlockPlan:
    """One inverted-residual block of the sub-network."""

    stage: int
    """Index of the stage in the search space."""
    index_in_stage: int
    supernet_index: int
    """Index of the supernet block that holds this block's weights."""
    in_channels: int
    out_channels: int
    mid_channels: int
    """Hidden width after the 1×1 expansion (the input width when ``expand`` is 1)."""
    kernel: int
    expand: int
    stride: int
    se: bool

    @property
    def identity(self) -> bool:
        """The shortcut is the identity (no pooling, no projection)."""
        return self.stride == 1 and self.in_channels == self.out_channels

    @property
    def shortcut_conv(self) -> bool:
        """The shortcut needs a 1×1 convolution (the channel count changes)."""
        return self.in_channels != self.out_channels


@dataclass(frozen=True, slots=True)
class HeadPlan:
    in_channels: int
    expanded: int
    """Channels of the final 1×1 expansion (``head.expand`` × the last stage's width)."""
    width: int
    """Channels of the feature-mix layer before the classifier."""


@dataclass(frozen=True, slots=True)
class SubnetPlan:
    resolution: int
    stem: StemPlan
    blocks: tuple[BlockPlan, ...]
    head: HeadPlan

    def spatial_sizes(self) -> tuple[int, list[int]]:
        """(side after the stem, side after each block) at ``resolution``."""
        side = self.resolution // self.stem.stride
        stem_side, sides = side, []
        for block in self.blocks:
            side //= block.stride
            sides.append(side)
        return stem_side, sides


def supernet_block_indices(space: SearchSpace) -> list[list[int]]:
    """Per stage, the supernet block indices of its ``max(depths)`` blocks, numbered in order."""
    indices, start = [], 0
    for stage in space.stages:
        count = max(stage.depths)
        indices.append(list(range(start, start + count)))
        start += count
    return indices


def plan_subnet(space: SearchSpace, arch: ArchConfig) -> SubnetPlan:
    """The validated shape of ``arch`` in ``space``."""
    arch.validate(space)
    blocks = []
    channels = arch.stem_width
    for s, (stage, indices) in enumerate(zip(space.stages, supernet_block_indices(space))):
        out, kernel, expand = arch.stage_widths[s], arch.kernels[s], arch.expands[s]
        for b in range(arch.depths[s]):
            mid = expanded_channels(channels, expand)
            stride = stage.stride if b == 0 else 1
            blocks.append(BlockPlan(s, b, indices[b], channels, out, mid, kernel, expand, stride, stage.se))
            channels = out
    head = HeadPlan(channels, space.head.expand * channels, arch.head_width)
    return SubnetPlan(
        arch.resolution, StemPlan(arch.stem_width, space.stem.kernel, space.stem.stride), tuple(blocks), head
    )
