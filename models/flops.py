"""Exact multiply-adds and parameter counts of a sub-network, computed from its architecture.

FLOPs follow the paper's convention (AlphaNet Table 3): multiply-adds of convolutions and linear
layers at the model's own resolution; BatchNorm, activations, pooling, residual adds and the input
rescale are not counted.  Parameters are every parameter of the standalone sub-network (BN affine
included) with a ``num_classes``-way classifier.

CLI: ``python -m models.flops configs/alphanet_models.yaml [--json]`` prints every model of the
table plus the search space's ``max`` and ``min`` sub-networks.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from models.mbconv.search_space import ArchConfig, SearchSpace, load_named_archs
from models.mbconv.subnet_plan import plan_subnet
from models.ops import se_channels
from models.slimmable.supernet import SlimmableSpace, slimmable_cost
from typedconfig import ConfigError


@dataclass(frozen=True, slots=True)
class Cost:
    macs: int
    params: int

    @property
    def mflops(self) -> float:
        return self.macs / 1e6

    @property
    def params_m(self) -> float:
        return self.params / 1e6


def _conv(cin: int, cout: int, kernel: int, out_hw: int, groups: int = 1, bias: bool = False) -> Cost:
    weights = cout * (cin // groups) * kernel * kernel
    return Cost(macs=weights * out_hw * out_hw, params=weights + (cout if bias else 0))


def _bn(channels: int) -> Cost:
    return Cost(macs=0, params=2 * channels)


def _sum(costs: list[Cost]) -> Cost:
    return Cost(macs=sum(c.macs for c in costs), params=sum(c.params for c in costs))


def subnet_cost(space: SearchSpace, arch: ArchConfig, num_classes: int = 1000) -> Cost:
    """Multiply-adds and parameters of ``arch`` (see module docstring for what counts)."""
    if isinstance(space, SlimmableSpace):
        macs, params = slimmable_cost(space, arch, num_classes)
        return Cost(macs=macs, params=params)
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
    ]
    costs.append(Cost(macs=head.width * num_classes, params=head.width * num_classes + num_classes))
    return _sum(costs)


def model_table(path: str, num_classes: int = 1000) -> list[dict]:
    """Rows ``{name, resolution, mflops, params_m}`` for every model in ``path`` plus max and min."""
    space, archs = load_named_archs(path)
    entries = [*archs.items(), ("max", space.largest()), ("min", space.smallest())]
    rows = []
    for name, arch in entries:
        cost = subnet_cost(space, arch, num_classes)
        rows.append(
            {
                "name": name,
                "resolution": arch.resolution,
                "mflops": round(cost.mflops, 3),
                "params_m": round(cost.params_m, 4),
            }
        )
    return rows


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column, justify in (("model", "left"), ("resolution", "right"), ("MFLOPs", "right"), ("params (M)", "right")):
        table.add_column(column, justify=justify)
    for row in rows:
        table.add_row(row["name"], str(row["resolution"]), f"{row['mflops']:.1f}", f"{row['params_m']:.2f}")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", help="model table YAML (search_space + models), e.g. configs/alphanet_models.yaml")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs for the params count")
    args = parser.parse_args(argv)
    try:
        rows = model_table(args.models, args.num_classes)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, f"{args.models}: multiply-adds at each model's resolution")
    return 0


if __name__ == "__main__":
    sys.exit(main())
