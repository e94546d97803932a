"""Universally slimmable MobileNetV1 / MobileNetV2 (AlphaNet §4.1, Tables 1–2): width is the only dimension.

A :class:`SlimmableSpace` (YAML with a ``family`` key, e.g. ``configs/search_spaces/slimmable_mbv2.yaml``)
holds the published layer table and a range of width multipliers on a grid (``width_step``).  A sub-network
is a :class:`WidthArch` (one multiplier, one resolution): every layer's channels are ``make_divisible(c × w,
8)`` as the published models round them, and it runs the leading slice of the widest network's weights.

``mobilenet_v2`` follows torchvision's ``mobilenet_v2(width_mult=w)`` exactly (ReLU6, inverted residuals
with ``round(in × t)`` hidden channels, a 1×1 last conv of ``make_divisible(1280 × max(1, w))``); so its
FLOPs and parameters equal torchvision's for every w.  ``mobilenet_v1`` is the depthwise-separable network
of Howard et al. 2017 (ReLU after every BN, no residuals, average pool, classifier).

The standalone model of a sub-network is the same module built for that one width
(:meth:`SlimmableSupernet.extract`): every slice is then the whole tensor, nothing of the supernet remains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.init import init_weights
from models.ops import (
    DynamicBatchNorm2d,
    DynamicConv2d,
    DynamicDepthwiseConv2d,
    DynamicLinear,
    checkpointed,
    conv_layout,
    make_divisible,
)
from typedconfig import from_mapping, load_yaml, to_mapping

Family = Literal["mobilenet_v1", "mobilenet_v2"]


@dataclass(kw_only=True, slots=True, frozen=True)
class SlimmableSpace:
    """A MobileNet layer table and the width multipliers its sub-networks may take."""

    name: str
    """Identifier, written into checkpoints and exports."""
    family: Family
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

    family: Family
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


class SlimBlockModule(nn.Module):
    """MobileNetV2: [1×1 expand + BN + ReLU6] → 3×3 depthwise + BN + ReLU6 → 1×1 project + BN (+ input when the
    shape is unchanged).  MobileNetV1: 3×3 depthwise + BN + ReLU → 1×1 pointwise + BN + ReLU."""

    def __init__(self, block: SlimBlock, family: Family, momentum: float | None):
        super().__init__()
        self.v2 = family == "mobilenet_v2"
        self.expand_conv = DynamicConv2d(block.in_channels, block.mid_channels, 1) if block.expand != 1 else None
        self.expand_bn = DynamicBatchNorm2d(block.mid_channels, momentum=momentum) if block.expand != 1 else None
        self.dw_conv = DynamicDepthwiseConv2d(block.mid_channels, 3, block.stride)
        self.dw_bn = DynamicBatchNorm2d(block.mid_channels, momentum=momentum)
        self.project_conv = DynamicConv2d(block.mid_channels, block.out_channels, 1)
        self.project_bn = DynamicBatchNorm2d(block.out_channels, momentum=momentum)

    def forward(self, x: torch.Tensor, block: SlimBlock) -> torch.Tensor:
        act = F.relu6 if self.v2 else F.relu
        h = x
        if self.expand_conv is not None:
            h = act(self.expand_bn(self.expand_conv(h, block.mid_channels)))
        h = act(self.dw_bn(self.dw_conv(h, 3)))
        h = self.project_bn(self.project_conv(h, block.out_channels))
        if not self.v2:
            return act(h)
        return x + h if block.residual else h


class SlimmableSupernet(nn.Module):
    """Stem → blocks → [last 1×1 conv] → pool → [dropout] → classifier, every layer sliced to the active width.

    ``only``: build the layers for that one sub-network (the standalone model :meth:`extract` returns)."""

    zero3_leaf_types = (SlimBlockModule,)
    """Under ZeRO-3 a block's parameters are gathered together (``trainer.engine.mark_zero3_leaves``)."""

    channels_last = True
    """Run the convolutions on channels-last tensors (see :func:`models.ops.conv_layout`); a runtime switch
    (``trainer.channels_last``) that changes no weight."""

    activation_checkpointing = False
    """Recompute each block's activations in the backward pass instead of storing them (in training mode with
    gradients enabled); BatchNorm running statistics are still updated once.  A runtime switch
    (``trainer.activation_checkpointing``) that changes no weight."""

    def __init__(self, space: SlimmableSpace, config: ModelConfig, *, only: WidthArch | None = None):
        super().__init__()
        self.space = space
        self.config = config
        self.num_classes = config.num_classes
        self.dropout = config.dropout
        self.built_for = only
        widest = plan_width(space, only or space.largest())
        momentum = config.bn_momentum
        self.stem_conv = DynamicConv2d(3, widest.stem, 3, 2)
        self.stem_bn = DynamicBatchNorm2d(widest.stem, momentum=momentum)
        self.blocks = nn.ModuleList(SlimBlockModule(b, space.family, momentum) for b in widest.blocks)
        self.last_conv = DynamicConv2d(widest.blocks[-1].out_channels, widest.last, 1) if widest.last else None
        self.last_bn = DynamicBatchNorm2d(widest.last, momentum=momentum) if widest.last else None
        self.classifier = DynamicLinear(widest.features, config.num_classes)
        init_weights(self, config.init)
        if config.zero_init_residual_bn:
            for module, block in zip(self.blocks, widest.blocks):
                if block.residual and module.v2:
                    nn.init.zeros_(module.project_bn.weight)
        self.regularize = only is not None  # a standalone model uses dropout whenever it is in train mode
        self.set_arch(only or space.largest(), regularize=self.regularize)

    @property
    def arch(self) -> WidthArch:
        return self._arch

    def set_arch(self, arch: WidthArch, *, regularize: bool = False) -> None:
        """Make ``arch`` the active sub-network; ``regularize`` turns dropout on."""
        if self.built_for is not None and arch != self.built_for:
            raise ValueError(f"this model was built for {self.built_for} only, not {arch}")
        self.plan = plan_width(self.space, arch)
        self._arch = arch
        self.regularize = regularize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        act = F.relu6 if plan.family == "mobilenet_v2" else F.relu
        x = act(self.stem_bn(self.stem_conv(conv_layout(x, self.channels_last), plan.stem)))
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for module, block in zip(self.blocks, plan.blocks):
            x = checkpointed(module, x, block) if checkpointing else module(x, block)
        if self.last_conv is not None:
            x = act(self.last_bn(self.last_conv(x, plan.last)))
        x = x.mean(dim=(2, 3))
        if self.regularize and self.training and self.dropout > 0:
            x = F.dropout(x, self.dropout, training=True)
        return self.classifier(x)

    def extract(self, arch: WidthArch | None = None) -> SlimmableSupernet:
        """A standalone copy of ``arch`` (default: the active one): weights and BN statistics sliced out."""
        from models.mbconv.static import copy_sliced_weights

        arch = arch or self.arch
        static = build_slimmable_subnet(self.space, arch, self.config.num_classes, self.config.dropout)
        copy_sliced_weights(self.state_dict(), static)
        return static.to(next(self.parameters()).device)


def build_slimmable_subnet(space: SlimmableSpace, arch: WidthArch, num_classes: int, dropout: float = 0.0):
    """The standalone model of ``arch`` (freshly initialised)."""
    config = ModelConfig(
        search_space=space.name, num_classes=num_classes, dropout=dropout, bn_momentum=0.1, zero_init_residual_bn=False
    )
    return SlimmableSupernet(space, config, only=arch)


def slimmable_cost(space: SlimmableSpace, arch: WidthArch, num_classes: int = 1000) -> tuple[int, int]:
    """(multiply-adds, parameters) of ``arch``: convolutions and the classifier at the model's resolution,
    parameters with BN affine (the convention of ``models.flops``)."""
    plan = plan_width(space, arch)
    side = arch.resolution // 2
    macs = params = 0

    def conv(cin: int, cout: int, kernel: int, out_side: int, groups: int = 1) -> None:
        nonlocal macs, params
        weights = cout * (cin // groups) * kernel * kernel
        macs += weights * out_side * out_side
        params += weights + 2 * cout  # + BN affine

    conv(3, plan.stem, 3, side)
    for block in plan.blocks:
        if block.expand != 1:
            conv(block.in_channels, block.mid_channels, 1, side)
        side //= block.stride
        conv(block.mid_channels, block.mid_channels, 3, side, groups=block.mid_channels)
        conv(block.mid_channels, block.out_channels, 1, side)
    if plan.last:
        conv(plan.blocks[-1].out_channels, plan.last, 1, side)
    macs += plan.features * num_classes
    params += plan.features * num_classes + num_classes
    return macs, params
