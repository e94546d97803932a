"""Exact multiply-adds and parameters of an MBConv sub-network, from its plan (the convention of
:mod:`models.flops`: convolutions and the classifier at the model's resolution, parameters with BN affine)."""

from __future__ import annotations

from models.mbconv.search_space import ArchConfig, SearchSpace
from models.mbconv.subnet_plan import plan_subnet
from models.ops import se_channels


def _conv(cin: int, cout: int, kernel: int, out_hw: int, groups: int = 1, bias: bool = False) -> tuple[int, int]:
    weights = cout * (cin // groups) * kernel * kernel
    return weights * out_hw * out_hw, weights + (cout if bias else 0)


def _bn(channels: int) -> tuple[int, int]:
    return 0, 2 * channels


def mbconv_cost(space: SearchSpace, arch: ArchConfig, num_classes: int = 1000) -> tuple[int, int]:
    """(multiply-adds, parameters) of ``arch``."""
    plan = plan_subnet(space, arch)
    side, block_sides = plan.spatial_sizes()
    costs = [_conv(3, plan.stem.out_channels, plan.stem.kernel, side), _bn(plan.stem.out_channels)]
    for block, out_side in zip(plan.blocks, block_sides):
        cin, mid, cout = block.in_channels, block.mid_channels, block.out_channels
        if block.expand != 1:
            costs += [_conv(cin, mid, 1, side), _bn(mid)]  # before the stride
        costs += [_conv(mid, mid, block.kernel, out_side, groups=mid), _bn(mid)]
        if block.se:
            se = se_channels(mid)
            costs += [_conv(mid, se, 1, 1, bias=True), _conv(se, mid, 1, 1, bias=True)]
        costs += [_conv(mid, cout, 1, out_side), _bn(cout)]
        if block.shortcut_conv:
            costs.append(_conv(cin, cout, 1, out_side))
        side = out_side
    head = plan.head
    costs += [
        _conv(head.in_channels, head.expanded, 1, side),
        _bn(head.expanded),
        _conv(head.expanded, head.width, 1, 1),
        (head.width * num_classes, head.width * num_classes + num_classes),
    ]
    return sum(macs for macs, _ in costs), sum(params for _, params in costs)
