"""Value ranges declared on config fields, checked in one place.

A field declares its range in its type: ``epochs: Annotated[int, Range(ge=1)] = 360``.  Each config's
``__post_init__`` calls :func:`check_ranges`, which checks every declared range (element-wise for
tuples, skipping ``None``) and raises ``ValueError("section.field must be ..., got ...")``; loading from
YAML turns that into a ConfigError naming the file.  Checks that involve several fields stay in
``__post_init__`` beside the call.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Range:
    """Bounds of a number: ``ge``/``gt`` below, ``le``/``lt`` above (any may be omitted)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def describe(self) -> str:
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}"
        return f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}"


@functools.cache
def declared_ranges(cls: type) -> dict[str, Range]:
    """Field name → declared Range of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    ranges = {}
    for f in dataclasses.fields(cls):
        for meta in getattr(hints[f.name], "__metadata__", ()):
            if isinstance(meta, Range):
                ranges[f.name] = meta
    return ranges


def check_ranges(config: Any, section: str) -> None:
    """Raise ValueError naming ``section.field`` (``field`` at the top level, ``section=""``) for the first value
    outside its declared range."""
    for name, bounds in declared_ranges(type(config)).items():
        value = getattr(config, name)
        values = value if isinstance(value, tuple | list) else (value,)
        if any(v is not None and not bounds.contains(v) for v in values):
            key = f"{section}.{name}" if section else name
            raise ValueError(f"{key} must be {bounds.describe()}, got {value}")
