"""Pieces that configs name: one :class:`Registry` per kind (sampler, teacher, KD loss, model family, ...).

A piece is a class registered under the name configs use::

    SAMPLERS = Registry("sampler", package="trainer.samplers")

    @SAMPLERS.register("uniform")
    class UniformSampler:
        Config = UniformConfig  # a dataclass deriving from the kind's base config, which names SAMPLERS

A registry created with ``package`` imports every module of that package the first time it is asked for a
name, so that a new piece is one new file in the package and nothing else.

A config field typed with a base config class that has a ``registry`` class attribute is a *tagged
section*: ``sampler: {name: attentive, candidates: 3}`` (or just ``sampler: attentive``) is converted by
:mod:`typedconfig.core` into the config class of the piece registered as ``attentive``; an unknown name is
a one-line error listing the registered names.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from typedconfig.core import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → piece, for one kind of piece."""

    def __init__(self, kind: str, *, package: str | None = None):
        """``kind``: what a piece is, for messages (``sampler``); ``package``: the package whose modules hold
        the pieces (imported when a name is first looked up)."""
        self.kind = kind
        self.package = package
        self._entries: dict[str, T] = {}
        self._discovered = package is None

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: register the piece under ``name`` (once)."""

        def decorate(piece: T) -> T:
            if name in self._entries and self._entries[name] is not piece:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({self._entries[name]!r}, {piece!r})")
            self._entries[name] = piece
            return piece

        return decorate

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{self.package}.{module.name}")

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def get(self, name: str, *, key: str | None = None, source: Any = None) -> T:
        """The piece registered as ``name``; otherwise a ConfigError listing the registered names."""
        self._discover()
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}", key=key, source=source
            )
        return self._entries[name]

    def config_class(self, name: str, *, key: str | None = None, source: Any = None) -> type:
        """The config dataclass of the piece registered as ``name`` (its ``Config`` attribute)."""
        return self.get(name, key=key, source=source).Config
