"""The channels of every layer of one width of a slimmable MobileNet, resolved once from (space, arch) and
used by the supernet and the cost."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.ops import make_divisible
from models.slimmable.space import MobileNet, SlimmableSpace, WidthArch


@dataclass(frozen=True, slots=True)
class SlimBlock:
    in_channels: int
    mid_channels: int
    """Channels of the depthwise conv (``round(in × expand)``; the input itself at expand 1)."""
    out_channels: int
    expand: int
    stride: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


@dataclass(frozen=True, slots=True)
class SlimPlan:
    """The channels of every layer of one width."""

    family: MobileNet
    resolution: int
    stem: int
    blocks: tuple[SlimBlock, ...]
    last: int
    """Channels of the last 1×1 conv (0: none, MobileNetV1)."""
    features: int = field(default=0)
    """Channels entering the classifier."""


def plan_width(space: SlimmableSpace, arch: WidthArch) -> SlimPlan:
    """Channels of ``arch`` (validated): torchvision's rounding for MobileNetV2, the same rule for V1."""
    arch.validate(space)
    w, d = arch.width, space.divisor
    channels = make_divisible(space.stem * w, d)
    stem, blocks = channels, []
    for expand, c, repeats, stride in space.layers:
        out = make_divisible(c * w, d)
        for i in range(repeats):
            mid = channels if expand == 1 else int(round(channels * expand))
            blocks.append(SlimBlock(channels, mid, out, expand, stride if i == 0 else 1))
            channels = out
    last = make_divisible(space.last_channels * max(1.0, w), d) if space.last_channels else 0
    return SlimPlan(space.family, arch.resolution, stem, tuple(blocks), last, last or channels)
