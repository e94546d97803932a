"""The config reference: field docstrings read from the source, the Markdown table, and docs/config.md current."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from typedconfig import Range
from typedconfig.reference import field_docs, reference

REPO = Path(__file__).resolve().parents[2]


@dataclass(kw_only=True)
class Inner:
    depth: Annotated[int, Range(ge=1)] = 2
    """How deep | it goes."""


@dataclass(kw_only=True)
class Outer:
    mode: Literal["a", "b"] = "a"
    """The ``mode``,
    on two lines."""
    undocumented: float | None = None
    inner: Inner = field(default_factory=Inner)
    """The inner section."""


def test_field_docs_are_the_strings_under_the_fields():
    assert field_docs(Outer) == {"mode": "The ``mode``,\non two lines.", "inner": "The inner section."}
    assert field_docs(Inner) == {"depth": "How deep | it goes."}


def test_reference_tables_and_sections():
    lines = reference(Outer)
    assert "| `mode` | 'a' \\| 'b' | `a` | The `mode`, on two lines. |" in lines
    assert "| `undocumented` | float \\| null | `null` |  |" in lines
    assert "### `inner`" in lines and "The inner section." in lines
    assert "| `inner.depth` | int (≥ 1) | `2` | How deep \\| it goes. |" in lines


def test_docs_config_md_is_current():
    done = subprocess.run([sys.executable, "scripts/config_reference.py", "--check"], cwd=REPO, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-500:]
