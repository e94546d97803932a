"""Standalone sub-networks built from plain torch layers, and their extraction from a supernet.

A :class:`StaticSubnet` needs nothing of the supernet: it is built from a search space (for strides,
SE flags and the head's expansion) and an :class:`ArchConfig`.  Its parameter names mirror the
supernet's, so extraction is a slice of each supernet tensor to the static shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.depthwise import depthwise_conv
from models.mbconv.search_space import ArchConfig, SearchSpace
from models.mbconv.subnet_plan import BlockPlan, plan_subnet
from models.mbconv.supernet import AlphaNetSupernet
from models.ops import conv_layout, copy_sliced_weights, pointwise_as_matmul, pointwise_conv, se_channels


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) whose 1×1 convolutions of channels-last CPU tensors run
    as a matrix product (:func:`models.ops.pointwise_conv`) and whose depthwise ones run
    :func:`models.depthwise.depthwise_conv`, like the supernet's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1 and pointwise_as_matmul(x, self.stride[0], self.kernel_size[0]):
            return pointwise_conv(x, self.weight, self.bias)
        if self.groups == self.in_channels == self.out_channels > 1 and self._plain_depthwise():
            return depthwise_conv(x, self.weight, self.stride[0])
        return super().forward(x)

    def _plain_depthwise(self) -> bool:
        """Square kernel, same stride both ways, padding k // 2, no dilation or bias: what
        :func:`models.depthwise.depthwise_conv` computes."""
        k = self.kernel_size[0]
        return (
            self.bias is None
            and self.kernel_size == (k, k)
            and self.stride[0] == self.stride[1]
            and self.padding == (k // 2, k // 2)
            and self.dilation == (1, 1)
            and self.padding_mode == "zeros"
        )


def _conv(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: pool → 1×1 conv + ReLU → 1×1 conv → hard sigmoid → scale."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        mid = se_channels(channels, reduction)
        self.reduce = _conv(channels, mid, bias=True)
        self.expand = _conv(mid, channels, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.hardsigmoid(self.expand(F.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True)))))
        return x * scale


class MBConvBlock(nn.Module):
    """A fixed inverted-residual block (see ``models.mbconv.supernet.DynamicMBConvBlock``)."""

    def __init__(self, block: BlockPlan):
        super().__init__()
        cin, mid, cout = block.in_channels, block.mid_channels, block.out_channels
        self.stride = block.stride
        self.expand_conv = _conv(cin, mid) if block.expand != 1 else None
        self.expand_bn = nn.BatchNorm2d(mid) if block.expand != 1 else None
        self.dw_conv = _conv(mid, mid, block.kernel, block.stride, groups=mid)
        self.dw_bn = nn.BatchNorm2d(mid)
        self.se = SqueezeExcite(mid) if block.se else None
        self.project_conv = _conv(mid, cout)
        self.project_bn = nn.BatchNorm2d(cout)
        self.identity = block.identity
        self.shortcut_conv = _conv(cin, cout) if block.shortcut_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand_conv is not None:
            h = F.silu(self.expand_bn(self.expand_conv(h)))
        h = F.silu(self.dw_bn(self.dw_conv(h)))
        if self.se is not None:
            h = self.se(h)
        h = self.project_bn(self.project_conv(h))
        if self.identity:
            return x + h
        shortcut = F.avg_pool2d(x, self.stride) if self.stride > 1 else x
        if self.shortcut_conv is not None:
            shortcut = self.shortcut_conv(shortcut)
        return h + shortcut


class StaticSubnet(nn.Module):
    """One sub-network of ``space`` as an ordinary ``nn.Module`` (expects inputs at ``arch.resolution``)."""

    channels_last = True
    """Run the convolutions on channels-last tensors (see :func:`models.ops.conv_layout`); a runtime switch
    (``engine.channels_last``) that changes no weight."""

    def __init__(self, space: SearchSpace, arch: ArchConfig, num_classes: int = 1000, dropout: float = 0.0):
        super().__init__()
        self.space = space
        self.arch = arch
        self.num_classes = num_classes
        self.dropout = dropout
        self.plan = plan = plan_subnet(space, arch)
        self.stem_conv = _conv(3, plan.stem.out_channels, plan.stem.kernel, plan.stem.stride)
        self.stem_bn = nn.BatchNorm2d(plan.stem.out_channels)
        self.blocks = nn.ModuleList(MBConvBlock(block) for block in plan.blocks)
        self.final_expand_conv = _conv(plan.head.in_channels, plan.head.expanded)
        self.final_expand_bn = nn.BatchNorm2d(plan.head.expanded)
        self.feature_mix_conv = _conv(plan.head.expanded, plan.head.width)
        self.classifier = nn.Linear(plan.head.width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.stem_bn(self.stem_conv(conv_layout(x, self.channels_last))))
        for block in self.blocks:
            x = block(x)
        x = F.silu(self.final_expand_bn(self.final_expand_conv(x)))
        x = F.silu(self.feature_mix_conv(x.mean(dim=(2, 3), keepdim=True))).flatten(1)
        x = F.dropout(x, self.dropout, training=self.training)
        return self.classifier(x)


def extract_static_subnet(supernet: AlphaNetSupernet, arch: ArchConfig | None = None) -> StaticSubnet:
    """Copy ``arch``'s weights and BN statistics out of ``supernet`` into a new :class:`StaticSubnet` (the
    active sub-network when ``arch`` is None). Under local sharing each block comes from the candidate the
    assignment gives ``arch`` (the active candidates when ``arch`` is None)."""
    candidates = supernet.candidates if arch is None else supernet.candidates_for(arch)
    arch = arch or supernet.arch
    static = StaticSubnet(supernet.space, arch, supernet.config.num_classes, supernet.config.dropout)
    block_map = [block.supernet_index for block in static.plan.blocks]

    def rename(key: str) -> str:  # block j of the subnet: its supernet block's candidate (local sharing)
        if not key.startswith("blocks."):
            return key
        _, j, rest = key.split(".", 2)
        index = block_map[int(j)]
        return supernet.block_prefix(index, candidates[index]) + rest

    copy_sliced_weights(supernet.state_dict(), static, rename)
    return static.to(next(supernet.parameters()).device)
