"""Exact multiply-adds and parameters of a slimmable MobileNet of one width."""

from __future__ import annotations

from models.slimmable.plan import plan_width
from models.slimmable.space import SlimmableSpace, WidthArch


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
