"""The model section of a run config."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from models.init import InitScheme
from typedconfig import Range, Registry, check_ranges, to_mapping

SHARING_LAYOUTS = Registry("weight sharing")
"""How the supernet's layers hold their weights, by the name ``model.sharing.name`` gives (the trainer's rule of the
same name, ``trainer.sharing``, trains them)."""


@dataclass(kw_only=True, slots=True)
class SharingConfig:
    """``model.sharing``: ``{name: global}`` (the default) or ``{name: local, ...}``."""

    registry: ClassVar[Registry] = SHARING_LAYOUTS
    name: str = "global"
    """``global``: one weight tensor per layer, sliced by every sub-network. ``local``: M candidate copies per
    layer, each architecture assigned to one (Distribution Consistent NAS)."""


@dataclass(kw_only=True, slots=True)
class GlobalSharingConfig(SharingConfig):
    name: str = "global"


@dataclass(kw_only=True, slots=True)
class LocalSharingConfig(SharingConfig):
    """``model.sharing: {name: local, ...}`` (the paper's symbols in brackets; before 0.2: ``model.sharing: local``
    with the keys in ``model.local``)."""

    name: str = "local"
    candidates: Annotated[int, Range(ge=2, le=8)] = 2
    """M: candidate weights per layer (the paper: 2)."""
    archs: Annotated[int, Range(ge=2, le=100_000)] = 64
    """N: sampled architectures whose assignments are learnt (the paper: 10,000 on ImageNet)."""
    assignment: Literal["learned", "random"] = "learned"
    """``learned``: the paper's Algorithm 1 (meta-network, gradient exchange, K-means on matching degrees, the
    cluster-to-candidate choice of Eq. 7). ``random``: the paper's "Random Assign" ablation (same schedule,
    each architecture's candidate drawn at random, no meta-network, no exchange)."""
    warmup_epochs: Annotated[float, Range(ge=0)] = 1.0
    """T_w: epochs of global sharing (every candidate receives the same gradient) before the first layer."""
    epochs_per_layer: Annotated[float, Range(gt=0)] = 1.0
    """T: epochs spent on each layer before its assignment is fixed; the epochs left after the last layer
    fine-tune (T_f)."""
    meta_every: Annotated[int, Range(ge=1)] = 20
    """τ: optimizer steps between meta-network updates (Eq. 12)."""
    meta_lr: Annotated[float, Range(gt=0)] = 0.1
    """η: SGD learning rate of the meta-networks."""
    representatives: Annotated[int, Range(ge=1)] = 4
    """Architectures per cluster whose losses choose the cluster's candidate (Eq. 7)."""
    seed: int = 0
    """Seed of the N sampled architectures, the K-means initialisation and the random draws."""

    def __post_init__(self) -> None:
        check_ranges(self, "model.sharing")


@SHARING_LAYOUTS.register("global")
class GlobalLayout:
    Config = GlobalSharingConfig


@SHARING_LAYOUTS.register("local")
class LocalLayout:
    Config = LocalSharingConfig


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Which supernet to build and how it is regularised."""

    search_space: str = "alphanet"
    """A built-in search space (``alphanet``, ``tiny``) or the path of a search-space YAML."""
    num_classes: Annotated[int, Range(ge=1)] = 1000
    """Classifier outputs."""
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.2
    """Dropout before the classifier; only on the largest sub-network during training."""
    drop_connect: Annotated[float, Range(ge=0, lt=1)] = 0.2
    """Stochastic depth ("drop path"; the paper's recipe calls it drop-connect): block i of N drops its residual
    branch with rate ``drop_connect × i / N``, only on the largest sub-network."""
    drop_connect_stages: Annotated[int, Range(ge=0)] = 2
    """Stochastic depth applies only to identity-shortcut blocks of this many last stages."""
    bn_momentum: Annotated[float | None, Range(ge=0, le=1)] = 0.0
    """BatchNorm running-statistics momentum during training. The reference uses 0 (statistics never
    updated) because every sub-network is recalibrated before evaluation; None is a cumulative average."""
    init: InitScheme = "reference"
    """Weight initialisation: ``reference`` (PyTorch's layer defaults, what the reference trains with) or
    ``kaiming_fan_out`` (Kaiming-normal fan-out convolutions, N(0, 0.01) classifier)."""
    zero_init_residual_bn: bool = True
    """Start the last BatchNorm gamma of every block at zero, so each block starts as its shortcut."""
    sharing: SharingConfig = field(default_factory=GlobalSharingConfig)
    """``{name: global}``: one weight tensor per layer, sliced by every sub-network. ``{name: local, candidates:
    M, ...}``: M candidate copies per layer, each architecture assigned to one (Distribution Consistent NAS)."""

    def __post_init__(self) -> None:
        check_ranges(self, "model")

    def config_paths(self, anchor) -> None:
        """A search-space YAML path is a path of the config (:mod:`typedconfig.paths`); a built-in name is not."""
        if Path(self.search_space).suffix in (".yaml", ".yml"):
            self.search_space = str(anchor("search_space", Path(self.search_space)))

    def identity(self) -> dict:
        """The fields that give the weights their meaning (hashed into checkpoints), in 0.1's form: the sharing rule
        only when it is not global (so checkpoints written before it existed still resume), as ``sharing: NAME``
        beside ``NAME: {its keys}``.  A search space read from a file is identified by the file's content, not by
        where it lies (config paths are absolute since 0.2, so moving a checkout must not change the identity)."""
        mapping = to_mapping(self)
        space_file = Path(self.search_space)
        if space_file.suffix in (".yaml", ".yml") and space_file.is_file():
            mapping["search_space"] = {"file_sha256": hashlib.sha256(space_file.read_bytes()).hexdigest()}
        sharing = mapping.pop("sharing")
        name = sharing.pop("name")
        if name != "global":
            mapping["sharing"], mapping[name] = name, sharing
        return mapping
