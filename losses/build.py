"""The loss modules a ``loss:`` section describes."""

from __future__ import annotations

from losses.config import LossConfig
from losses.cross_entropy import LabelSmoothingCrossEntropy
from losses.divergences import KDLoss
from losses.registry import KD_LOSSES, NO_KD


def build_kd_loss(config: LossConfig) -> KDLoss | None:
    """The KD loss named by ``config.kd_loss`` (None for ``none``: no distillation)."""
    return None if config.kd_loss == NO_KD else KD_LOSSES.get(config.kd_loss).from_config(config)


def build_label_loss(config: LossConfig) -> LabelSmoothingCrossEntropy:
    return LabelSmoothingCrossEntropy(config.label_smoothing)
