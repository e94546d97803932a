"""Relative paths of a typed config, made absolute by a rule the caller gives.

A relative path means nothing until something says what it is relative to; the shell's folder is the one
answer that changes with where a user happens to stand.  :func:`anchor_paths` walks a built config and hands
every relative path to ``anchor(key, path)``, which returns the absolute path to store; the caller's rule
decides (e.g. the config file's folder, the repository, or the shell's folder for a ``--set`` value).

Fields typed ``Path`` (or ``Path | None``) are found on their own.  A string field that holds a path among
other text (``FILE:NAME``, a name or a file) is declared by the dataclass with a method
``config_paths(self, anchor)`` that rewrites it, calling ``anchor(name, path)`` with the field's name.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

Anchor = Callable[[str, Path], Path]
"""``(dotted key, relative path) -> absolute path``."""


def absolute(path: Path, base: Path) -> Path:
    """``base / path`` normalised (``..`` folded), symlinks kept as written."""
    return Path(os.path.normpath(base / path))


def anchor_paths(config: Any, anchor: Anchor, prefix: str = "") -> None:
    """Replace, in place, every relative path of ``config`` (a dataclass, nested ones included) by
    ``anchor(key, path)``."""
    if not dataclasses.is_dataclass(config):
        return
    for field in dataclasses.fields(config):
        key = f"{prefix}{field.name}"
        value = getattr(config, field.name)
        if isinstance(value, Path):
            if not value.is_absolute():
                setattr(config, field.name, anchor(key, value))
        elif dataclasses.is_dataclass(value):
            anchor_paths(value, anchor, f"{key}.")
    hook = getattr(config, "config_paths", None)
    if callable(hook):
        hook(lambda name, path: path if Path(path).is_absolute() else anchor(f"{prefix}{name}", Path(path)))
