"""The weight-sharing supernet over a :class:`SearchSpace`.

Set a sub-network with :meth:`AlphaNetSupernet.set_arch`, then call the module as usual.  Every rank
must run the same sub-network at the same step (DeepSpeed ZeRO reduces whole parameter tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.ops import (
    DynamicBatchNorm2d,
    DynamicConv2d,
    DynamicDepthwiseConv2d,
    DynamicLinear,
    DynamicSqueezeExcite,
    drop_connect,
    expanded_channels,
)
from models.search_space import ArchConfig, SearchSpace, StageSpace


class DynamicMBConvBlock(nn.Module):
    """Inverted residual: [1×1 expand + BN + act] → k×k depthwise + BN + act → [SE] → 1×1 project + BN.

    The shortcut is the identity when the active shape is unchanged, otherwise an average pool
    (stride 2) and/or a plain 1×1 convolution without BN (channel change).
    """

    def __init__(self, in_widths: tuple[int, ...], stage: StageSpace, stride: int, bn_momentum: float | None):
        super().__init__()
        max_in, max_out = max(in_widths), max(stage.widths)
        max_expand = max(stage.expands)
        max_mid = max(expanded_channels(max_in, e) for e in stage.expands)
        self.stride = stride
        self.expand_conv = DynamicConv2d(max_in, max_mid, 1) if max_expand > 1 else None
        self.expand_bn = DynamicBatchNorm2d(max_mid, momentum=bn_momentum) if max_expand > 1 else None
        self.dw_conv = DynamicDepthwiseConv2d(max_mid, max(stage.kernels), stride)
        self.dw_bn = DynamicBatchNorm2d(max_mid, momentum=bn_momentum)
        self.se = DynamicSqueezeExcite(max_mid) if stage.se else None
        self.project_conv = DynamicConv2d(max_mid, max_out, 1)
        self.project_bn = DynamicBatchNorm2d(max_out, momentum=bn_momentum)
        always_identity = stride == 1 and len(in_widths) == 1 and in_widths == stage.widths
        self.shortcut_conv = None if always_identity else DynamicConv2d(max_in, max_out, 1)
        # Active configuration, set by the supernet.
        self.out_channels = max_out
        self.kernel_size = max(stage.kernels)
        self.expand = max_expand
        self.drop_connect_rate = 0.0  # used only when the supernet runs with regularisation on

    def forward(self, x: torch.Tensor, drop_connect_rate: float = 0.0) -> torch.Tensor:
        in_channels = x.shape[1]
        h = x
        if self.expand != 1:
            h = F.silu(self.expand_bn(self.expand_conv(h, expanded_channels(in_channels, self.expand))))
        h = F.silu(self.dw_bn(self.dw_conv(h, self.kernel_size)))
        if self.se is not None:
            h = self.se(h)
        h = self.project_bn(self.project_conv(h, self.out_channels))
        if self.stride == 1 and in_channels == self.out_channels:
            if self.training and drop_connect_rate > 0:
                h = drop_connect(h, drop_connect_rate)
            return x + h
        shortcut = F.avg_pool2d(x, self.stride) if self.stride > 1 else x
        if in_channels != self.out_channels:
            shortcut = self.shortcut_conv(shortcut, self.out_channels)
        return h + shortcut


class AlphaNetSupernet(nn.Module):
    """Stem → stages of dynamic MBConv blocks → MBPool head → classifier, all sliceable."""

    def __init__(self, space: SearchSpace, config: ModelConfig):
        super().__init__()
        self.space = space
        self.config = config
        momentum = config.bn_momentum
        max_stem = max(space.stem.widths)
        self.stem_conv = DynamicConv2d(3, max_stem, space.stem.kernel, space.stem.stride)
        self.stem_bn = DynamicBatchNorm2d(max_stem, momentum=momentum)

        blocks: list[DynamicMBConvBlock] = []
        self.stage_blocks: list[list[int]] = []
        in_widths = space.stem.widths
        for stage in space.stages:
            indices = []
            for i in range(max(stage.depths)):
                indices.append(len(blocks))
                blocks.append(DynamicMBConvBlock(in_widths, stage, stage.stride if i == 0 else 1, momentum))
                in_widths = stage.widths
            self.stage_blocks.append(indices)
        self.blocks = nn.ModuleList(blocks)

        max_last = max(space.stages[-1].widths)
        max_expanded = space.head.expand * max_last
        self.final_expand_conv = DynamicConv2d(max_last, max_expanded, 1)
        self.final_expand_bn = DynamicBatchNorm2d(max_expanded, momentum=momentum)
        self.feature_mix_conv = DynamicConv2d(max_expanded, max(space.head.widths), 1)
        self.classifier = DynamicLinear(max(space.head.widths), config.num_classes)

        if config.zero_init_residual_bn:
            for block in self.blocks:
                nn.init.zeros_(block.project_bn.weight)
        self._set_drop_connect_rates()
        self.arch: ArchConfig | None = None
        self.regularize = False
        self.set_arch(space.largest())

    def _set_drop_connect_rates(self) -> None:
        """Rate ``drop_connect × index / total`` on the blocks of the last N stages, 0 elsewhere."""
        total = len(self.blocks)
        last = self.config.drop_connect_stages
        eligible = {i for stage in self.stage_blocks[len(self.stage_blocks) - last :] for i in stage} if last else set()
        for idx, block in enumerate(self.blocks):
            block.drop_connect_rate = self.config.drop_connect * idx / total if idx in eligible else 0.0

    def set_arch(self, arch: ArchConfig, *, regularize: bool = False) -> None:
        """Make ``arch`` the active sub-network; ``regularize`` turns dropout and drop-connect on."""
        arch.validate(self.space)
        self.arch = arch
        self.regularize = regularize
        for stage_idx, indices in enumerate(self.stage_blocks):
            for idx in indices:
                block = self.blocks[idx]
                block.out_channels = arch.widths[stage_idx + 1]
                block.kernel_size = arch.kernels[stage_idx]
                block.expand = arch.expands[stage_idx]

    def active_block_indices(self, arch: ArchConfig | None = None) -> list[int]:
        """Supernet block indices run by ``arch`` (the first ``depth`` blocks of each stage)."""
        arch = arch or self.arch
        return [idx for indices, depth in zip(self.stage_blocks, arch.depths) for idx in indices[:depth]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arch = self.arch
        regularize = self.regularize and self.training
        x = F.silu(self.stem_bn(self.stem_conv(x, arch.widths[0])))
        for idx in self.active_block_indices(arch):
            block = self.blocks[idx]
            x = block(x, block.drop_connect_rate if regularize else 0.0)
        last = arch.widths[-2]
        x = F.silu(self.final_expand_bn(self.final_expand_conv(x, self.space.head.expand * last)))
        x = x.mean(dim=(2, 3), keepdim=True)
        x = F.silu(self.feature_mix_conv(x, arch.widths[-1])).flatten(1)
        if regularize and self.config.dropout > 0:
            x = F.dropout(x, self.config.dropout, training=True)
        return self.classifier(x)
