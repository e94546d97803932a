"""An MBConv sub-network cut into the parts a latency table times one by one (:mod:`models.latency`): the stem,
each inverted-residual block at its input size, and the head with the classifier.

A part is named by its shape alone (its key), so two sub-networks that run the same block at the same input size
share one table entry.  The parts are built from the same classes as :class:`~models.mbconv.static.StaticSubnet`,
so a part runs exactly the operators of its slice of the standalone model.  What the whole model does besides its
parts (the input's conversion to channels-last, the calls between them) is the table's fixed overhead.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from models.families import LatencyPart
from models.mbconv.search_space import ArchConfig, SearchSpace
from models.mbconv.static import MBConvBlock, _conv
from models.mbconv.subnet_plan import BlockPlan, HeadPlan, StemPlan, plan_subnet
from models.ops import expanded_channels


class Stem(nn.Module):
    """The stem of :class:`~models.mbconv.static.StaticSubnet`: convolution, BN, SiLU."""

    def __init__(self, stem: StemPlan):
        super().__init__()
        self.conv = _conv(3, stem.out_channels, stem.kernel, stem.stride)
        self.bn = nn.BatchNorm2d(stem.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn(self.conv(x)))


class Head(nn.Module):
    """The head of :class:`~models.mbconv.static.StaticSubnet`: final expansion, pool, feature mix, classifier
    (no dropout: latency is measured in eval mode, where it is the identity)."""

    def __init__(self, head: HeadPlan, num_classes: int):
        super().__init__()
        self.final_expand_conv = _conv(head.in_channels, head.expanded)
        self.final_expand_bn = nn.BatchNorm2d(head.expanded)
        self.feature_mix_conv = _conv(head.expanded, head.width)
        self.classifier = nn.Linear(head.width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.final_expand_bn(self.final_expand_conv(x)))
        x = F.silu(self.feature_mix_conv(x.mean(dim=(2, 3), keepdim=True))).flatten(1)
        return self.classifier(x)


def stem_part(resolution: int, stem: StemPlan) -> LatencyPart:
    key = f"stem:r{resolution}:c3-{stem.out_channels}:k{stem.kernel}:s{stem.stride}"
    return LatencyPart(key, (3, resolution, resolution), lambda: Stem(stem))


def block_part(side: int, block: BlockPlan) -> LatencyPart:
    """Block ``block`` run on a ``side`` × ``side`` input; its key holds every field its operators depend on
    (not its stage or position, which do not change what it computes)."""
    key = (
        f"block:r{side}:c{block.in_channels}-{block.mid_channels}-{block.out_channels}:k{block.kernel}"
        f":e{block.expand}:s{block.stride}:se{int(block.se)}"
    )
    return LatencyPart(key, (block.in_channels, side, side), lambda: MBConvBlock(block))


def head_part(side: int, head: HeadPlan, num_classes: int) -> LatencyPart:
    key = f"head:r{side}:c{head.in_channels}-{head.expanded}-{head.width}:n{num_classes}"
    return LatencyPart(key, (head.in_channels, side, side), lambda: Head(head, num_classes))


def latency_parts(space: SearchSpace, arch: ArchConfig, num_classes: int) -> list[LatencyPart]:
    """The stem, every block and the head of ``arch``, in the order the model runs them."""
    plan = plan_subnet(space, arch)
    side, block_sides = plan.spatial_sizes()
    parts = [stem_part(plan.resolution, plan.stem)]
    for block, out_side in zip(plan.blocks, block_sides):
        parts.append(block_part(side, block))
        side = out_side
    parts.append(head_part(side, plan.head, num_classes))
    return parts


def all_latency_parts(space: SearchSpace, num_classes: int) -> list[LatencyPart]:
    """Every distinct part any sub-network of ``space`` can run (a complete table's entries), in a fixed order:
    per resolution, the stems, then stage by stage the first blocks (from every width the previous stage can end
    with) and the repeated ones, then the heads."""
    parts: dict[str, LatencyPart] = {}

    def add(part: LatencyPart) -> None:
        parts.setdefault(part.key, part)

    for resolution in space.resolutions:
        side = resolution // space.stem.stride
        for width in space.stem.widths:
            add(stem_part(resolution, StemPlan(width, space.stem.kernel, space.stem.stride)))
        previous = space.stem.widths
        for s, stage in enumerate(space.stages):
            choices = itertools.product(stage.widths, stage.kernels, stage.expands)
            for cout, kernel, expand in choices:
                for cin in previous:
                    plan = BlockPlan(
                        s, 0, 0, cin, cout, expanded_channels(cin, expand), kernel, expand, stage.stride, stage.se
                    )
                    add(block_part(side, plan))
                if max(stage.depths) > 1:
                    plan = BlockPlan(s, 1, 0, cout, cout, expanded_channels(cout, expand), kernel, expand, 1, stage.se)
                    add(block_part(side // stage.stride, plan))
            side //= stage.stride
            previous = stage.widths
        for cin, width in itertools.product(previous, space.head.widths):
            add(head_part(side, HeadPlan(cin, space.head.expand * cin, width), num_classes))
    return list(parts.values())
