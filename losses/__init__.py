"""Cross-entropy and knowledge-distillation divergences, selected by name from the config."""

from losses.build import build_kd_loss, build_label_loss
from losses.config import LossConfig
from losses.cross_entropy import LabelSmoothingCrossEntropy
from losses.divergences import (
    AdaptiveAlphaDivergence,
    AlphaDivergence,
    KDLoss,
    KLDivergence,
    ReverseKLDivergence,
    SymmetricKLDivergence,
)
from losses.registry import KD_LOSSES, check_kd_loss, kd_loss_names

__all__ = [
    "KD_LOSSES",
    "AdaptiveAlphaDivergence",
    "AlphaDivergence",
    "KDLoss",
    "KLDivergence",
    "LabelSmoothingCrossEntropy",
    "LossConfig",
    "ReverseKLDivergence",
    "SymmetricKLDivergence",
    "build_kd_loss",
    "build_label_loss",
    "check_kd_loss",
    "kd_loss_names",
]
