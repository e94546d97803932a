"""The two model families behind one set of calls: AlphaNet MBConv supernets (``SearchSpace``/``ArchConfig``)
and slimmable MobileNets (``SlimmableSpace``/``WidthArch``).  A space file with a ``family`` key is slimmable;
an arch with a ``width`` key is a width multiplier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.mbconv.search_space import ArchConfig, SearchSpace
from models.slimmable.supernet import SlimmableSpace, WidthArch

AnySpace = SearchSpace | SlimmableSpace
AnyArch = ArchConfig | WidthArch


def space_from_dict(data: dict[str, Any], *, source: str | Path | None = None) -> AnySpace:
    cls = SlimmableSpace if isinstance(data, dict) and "family" in data else SearchSpace
    return cls.from_dict(data, source=source)


def arch_from_dict(data: dict[str, Any], *, source: str | Path | None = None) -> AnyArch:
    cls = WidthArch if isinstance(data, dict) and "width" in data else ArchConfig
    return cls.from_dict(data, source=source)
