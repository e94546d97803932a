"""Exact multiply-adds and parameter counts of a sub-network, computed from its architecture.

FLOPs follow the paper's convention (AlphaNet Table 3): multiply-adds of convolutions and linear
layers at the model's own resolution; BatchNorm, activations, pooling, residual adds and the input
rescale are not counted.  Parameters are every parameter of the standalone sub-network (BN affine
included) with a ``num_classes``-way classifier.

Each family counts its own networks (:meth:`models.families.Family.cost`); :func:`subnet_cost` is the entry.

CLI: ``python -m models.flops configs/alphanet_models.yaml [--json]`` prints every model of the
table plus the search space's ``max`` and ``min`` sub-networks.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from models.families import Arch, Space, family_of, load_named_archs
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


def subnet_cost(space: Space, arch: Arch, num_classes: int = 1000) -> Cost:
    """Multiply-adds and parameters of ``arch`` (see module docstring for what counts), counted by the family of
    ``space``."""
    macs, params = family_of(space).cost(space, arch, num_classes)
    return Cost(macs=macs, params=params)


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
