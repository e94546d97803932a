"""Model families behind one set of calls: one folder per family in ``models/`` (OFA's ``ofa_mbv3.py``,
``ofa_proxyless.py``, ...), each registering a :class:`Family` with the same methods in :data:`FAMILIES`.

Callers ask the family of a space (:func:`family_of`) and never look at a space's type: the AlphaNet /
AttentiveNAS MBConv supernets (``models/mbconv/``) and the slimmable MobileNets (``models/slimmable/``) are
built, extracted, costed and read from files through the functions below.  A new family is a new folder
whose ``__init__`` registers it: the registry imports every module of ``models`` the first time a family is
looked up.

Files keep their formats: each family recognises its own search-space and arch mappings by a marker key
(:meth:`Family.owns_space_dict`, :meth:`Family.owns_arch_dict`); the one family whose format has no marker
(``unmarked``) reads every mapping no other family claims.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from torch import nn

from models.config import ModelConfig
from typedconfig import ConfigError, Registry, load_yaml

SEARCH_SPACE_DIR = Path(__file__).resolve().parent.parent / "configs" / "search_spaces"


class Arch(Protocol):
    """One sub-network of a space, whatever its family (what shared code uses of it)."""

    resolution: int

    def problems(self, space: Any) -> list[str]: ...
    def validate(self, space: Any) -> Arch: ...
    def get_gene(self, gene: str) -> Any: ...
    def with_genes(self, genes: dict[str, Any]) -> Arch: ...
    def to_dict(self) -> dict[str, Any]: ...


class Space(Protocol):
    """A search space, whatever its family (what shared code uses of it)."""

    family_name: ClassVar[str]
    """The name its family is registered under (:func:`family_of`)."""
    name: str
    resolutions: tuple[int, ...]

    @property
    def total_stride(self) -> int: ...
    def choices(self) -> list[tuple[str, tuple]]: ...
    def largest(self) -> Arch: ...
    def smallest(self) -> Arch: ...
    def arch_from_dict(self, data: dict[str, Any], *, source: str | Path | None = None) -> Arch: ...
    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class LatencyPart:
    """A piece of a sub-network that a latency table times on its own (:mod:`models.latency`)."""

    key: str
    """Names the part's shape: two parts with one key run the same operators on inputs of one size."""
    input_shape: tuple[int, int, int]
    """(channels, height, width) of one input sample."""
    build: Callable[[], nn.Module]
    """A freshly initialised module of the part (its latency does not depend on the weights' values)."""


class Family(ABC):
    """What every model family provides; one instance per family is registered (:func:`register`)."""

    name: ClassVar[str]
    """The registry key, also every space's ``family_name``."""
    unmarked: ClassVar[bool] = False
    """Reads the space and arch mappings no family claims (its file format came first and has no marker key)."""
    supports_local_sharing: ClassVar[bool] = False
    """Its supernet can hold per-layer candidate weights (``model.sharing: local``)."""

    def owns_space_dict(self, data: Any) -> bool:
        """Whether a search-space mapping (a space file, an export's ``search_space``) is this family's."""
        return False

    def owns_arch_dict(self, data: Any) -> bool:
        """Whether an arch mapping read without its space (a search record) is this family's."""
        return False

    @abstractmethod
    def space_from_dict(self, data: dict[str, Any], *, source: str | Path | None = None) -> Space: ...

    @abstractmethod
    def arch_from_dict(self, data: dict[str, Any], *, source: str | Path | None = None) -> Arch: ...

    @abstractmethod
    def build_supernet(self, space: Space, config: ModelConfig) -> nn.Module:
        """The weight-sharing supernet of ``space``, its largest sub-network active."""

    @abstractmethod
    def build_subnet(self, space: Space, arch: Arch, num_classes: int, dropout: float) -> nn.Module:
        """A freshly initialised standalone model of ``arch``."""

    @abstractmethod
    def extract_subnet(self, supernet: nn.Module, arch: Arch | None) -> nn.Module:
        """A standalone copy of ``arch``'s weights and BN statistics (the active sub-network when None)."""

    @abstractmethod
    def cost(self, space: Space, arch: Arch, num_classes: int) -> tuple[int, int]:
        """(multiply-adds, parameters) of ``arch``, as :mod:`models.flops` counts them."""

    def latency_parts(self, space: Space, arch: Arch, num_classes: int) -> list[LatencyPart]:
        """``arch`` cut into the parts a per-block latency table times, in the order the model runs them; every
        layer of the model lies in exactly one part."""
        raise NotImplementedError(f"model family {self.name!r} has no per-block latency decomposition")

    def all_latency_parts(self, space: Space, num_classes: int) -> list[LatencyPart]:
        """Every distinct part (by key) that some sub-network of ``space`` runs."""
        raise NotImplementedError(f"model family {self.name!r} has no per-block latency decomposition")

    def table_archs(self, space: Space) -> dict[str, Arch]:
        """Sub-networks the search scores one by one and prints as a table, by name (AlphaNet Table 1: every
        width of a slimmable space); none by default."""
        return {}


FAMILIES: Registry[Family] = Registry("model family", package="models")


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: register an instance of the family ``cls`` under ``cls.name``."""
    FAMILIES.register(cls.name)(cls())
    return cls


def family_of(space: Space) -> Family:
    """The family ``space`` belongs to."""
    return FAMILIES.get(space.family_name)


def _reader(owns: Callable[[Family], bool]) -> Family:
    """The family that claims a mapping, else the unmarked one."""
    families = [FAMILIES.get(name) for name in FAMILIES.names()]
    claims = [family for family in families if owns(family)] or [family for family in families if family.unmarked]
    if len(claims) != 1:
        raise ValueError(f"{len(claims)} model families read this mapping: {[f.name for f in claims]}")
    return claims[0]


def space_from_dict(data: dict[str, Any], *, source: str | Path | None = None) -> Space:
    """The search space a mapping describes, read by the family it belongs to."""
    return _reader(lambda family: family.owns_space_dict(data)).space_from_dict(data, source=source)


def arch_from_dict(data: dict[str, Any], *, source: str | Path | None = None) -> Arch:
    """The arch a mapping describes, without its space (a search record), read by the family it belongs to."""
    return _reader(lambda family: family.owns_arch_dict(data)).arch_from_dict(data, source=source)


def builtin_search_spaces() -> dict[str, Path]:
    """Names of the spaces shipped in ``configs/search_spaces`` → their files."""
    return {p.stem: p for p in sorted(SEARCH_SPACE_DIR.glob("*.yaml"))}


def load_search_space(name_or_path: str | Path) -> Space:
    """A built-in space by name (``alphanet``, ``tiny``, ``slimmable_mbv2``, ...) or a YAML file path."""
    builtin = builtin_search_spaces()
    if str(name_or_path) in builtin:
        path = builtin[str(name_or_path)]
    elif Path(name_or_path).suffix in (".yaml", ".yml") or Path(name_or_path).exists():
        path = Path(name_or_path)
    else:
        raise ConfigError(f"unknown search space {str(name_or_path)!r}; built-in: {sorted(builtin)} or a YAML path")
    return space_from_dict(load_yaml(path), source=path)


def load_named_archs(path: str | Path) -> tuple[Space, dict[str, Arch]]:
    """Read a model table YAML (``search_space:`` + ``models: {name: arch}``), validating each arch."""
    data = load_yaml(path)
    unknown = sorted(set(data) - {"search_space", "models"})
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; allowed: ['models', 'search_space']", key=unknown[0], source=path)
    if "search_space" not in data or "models" not in data:
        raise ConfigError("needs 'search_space' and 'models'", source=path)
    space = load_search_space(data["search_space"])
    archs = {}
    for name, entry in (data["models"] or {}).items():
        if not isinstance(entry, dict):
            raise ConfigError("expected a mapping", key=f"models.{name}", source=path)
        arch = space.arch_from_dict(entry, source=path)
        problems = arch.problems(space)
        if problems:
            raise ConfigError("; ".join(problems), key=f"models.{name}", source=path)
        archs[str(name)] = arch
    return space, archs


def build_supernet(config: ModelConfig) -> nn.Module:
    """The supernet described by a model config section, of its search space's family."""
    space = load_search_space(config.search_space)
    return family_of(space).build_supernet(space, config)


def build_subnet(space: Space, arch: Arch, num_classes: int = 1000, dropout: float = 0.0) -> nn.Module:
    """A freshly initialised standalone model of ``arch`` in ``space`` (any family)."""
    return family_of(space).build_subnet(space, arch, num_classes, dropout)


def extract_subnet(supernet: nn.Module, arch: Arch | None = None) -> nn.Module:
    """Copy ``arch``'s weights and BN statistics out of ``supernet`` into a new standalone model (the active
    sub-network when ``arch`` is None); under local sharing each block comes from the candidate the assignment
    gives ``arch``."""
    return family_of(supernet.space).extract_subnet(supernet, arch)
