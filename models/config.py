"""The model section of a run config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Which supernet to build and how it is regularised."""

    search_space: str = "alphanet"
    """A built-in search space (``alphanet``, ``tiny``) or the path of a search-space YAML."""
    num_classes: int = 1000
    """Classifier outputs."""
    dropout: float = 0.2
    """Dropout before the classifier; only on the largest sub-network during training."""
    drop_connect: float = 0.2
    """Stochastic depth ("drop path"; the paper's recipe calls it drop-connect): block i of N drops its residual
    branch with rate ``drop_connect × i / N``, only on the largest sub-network."""
    drop_connect_stages: int = 2
    """Stochastic depth applies only to identity-shortcut blocks of this many last stages."""
    bn_momentum: float | None = 0.0
    """BatchNorm running-statistics momentum during training. The reference uses 0 (statistics never
    updated) because every sub-network is recalibrated before evaluation; None is a cumulative average."""
    zero_init_residual_bn: bool = True
    """Start the last BatchNorm gamma of every block at zero, so each block starts as its shortcut."""

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1, got {self.num_classes}")
        for name in ("dropout", "drop_connect"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {value}")
        if self.drop_connect_stages < 0:
            raise ValueError(f"model.drop_connect_stages must be >= 0, got {self.drop_connect_stages}")
        if self.bn_momentum is not None and not 0.0 <= self.bn_momentum <= 1.0:
            raise ValueError(f"model.bn_momentum must be in [0, 1] or null, got {self.bn_momentum}")
