"""Cross-entropy and knowledge-distillation divergences, selected by name from the config."""

from losses.config import KD_LOSSES, LossConfig, build_kd_loss, build_label_loss
from losses.cross_entropy import LabelSmoothingCrossEntropy
from losses.divergences import (
    AdaptiveAlphaDivergence,
    AlphaDivergence,
    KDLoss,
    KLDivergence,
    ReverseKLDivergence,
    SymmetricKLDivergence,
)

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
]
