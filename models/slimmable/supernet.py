"""The slimmable supernet: a MobileNet whose every layer runs the leading slice of the widest network's weights.

The standalone model of a sub-network is the same module built for that one width
(:meth:`SlimmableSupernet.extract`): every slice is then the whole tensor, nothing of the supernet remains.
"""

from __future__ import annotations

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
    copy_sliced_weights,
)
from models.slimmable.plan import SlimBlock, plan_width
from models.slimmable.space import MobileNet, SlimmableSpace, WidthArch


class SlimBlockModule(nn.Module):
    """MobileNetV2: [1×1 expand + BN + ReLU6] → 3×3 depthwise + BN + ReLU6 → 1×1 project + BN (+ input when the
    shape is unchanged).  MobileNetV1: 3×3 depthwise + BN + ReLU → 1×1 pointwise + BN + ReLU."""

    def __init__(self, block: SlimBlock, family: MobileNet, momentum: float | None):
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
    """Under ZeRO-3 a block's parameters are gathered together (``trainer.runtime.engine.mark_zero3_leaves``)."""

    channels_last = True
    """Run the convolutions on channels-last tensors (see :func:`models.ops.conv_layout`); a runtime switch
    (``engine.channels_last``) that changes no weight."""

    activation_checkpointing = False
    """Recompute each block's activations in the backward pass instead of storing them (in training mode with
    gradients enabled); BatchNorm running statistics are still updated once.  A runtime switch
    (``engine.activation_checkpointing``) that changes no weight."""

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
