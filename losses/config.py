"""The loss section of a run config and the builders it drives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from losses.cross_entropy import LabelSmoothingCrossEntropy
from losses.divergences import (
    AdaptiveAlphaDivergence,
    AdaptiveChoice,
    AlphaDivergence,
    KDLoss,
    KLDivergence,
    ReverseKLDivergence,
    SymmetricKLDivergence,
)
from typedconfig import Range, check_ranges

KDLossName = Literal["adaptive_alpha", "alpha", "kl", "reverse_kl", "symmetric_kl", "none"]


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """Losses of the sandwich rule: label-smoothed CE for the largest net, a KD loss for the others."""

    kd_loss: KDLossName = "adaptive_alpha"
    """KD loss of the distilled sub-networks: adaptive_alpha | alpha | kl | reverse_kl | symmetric_kl; ``none``:
    every sub-network trains on the label-smoothed CE (the paper's "w/o KD" rows)."""
    alpha: float = 1.0
    """α of ``kd_loss: alpha``."""
    alpha_minus: float = -1.0
    """α− of ``kd_loss: adaptive_alpha`` (penalises over-estimating the teacher's uncertainty)."""
    alpha_plus: float = 1.0
    """α+ of ``kd_loss: adaptive_alpha`` (penalises under-estimation)."""
    adaptive_choice: AdaptiveChoice = "reference"
    """How ``adaptive_alpha`` picks its branch per sample: ``reference`` compares the clipped values as the
    reference implementation does (α− only when strictly larger); ``exact`` compares the exact divergences."""
    clip: Annotated[float | None, Range(gt=0)] = 5.0
    """β, the clip of the importance weights (p/q)^α for alpha losses; null disables clipping."""
    temperature: Annotated[float, Range(gt=0)] = 1.0
    """Softmax temperature of ``kd_loss: kl``."""
    label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.1
    """ε of the largest sub-network's cross-entropy, spread as ε/K over all K classes."""
    kd_weight: Annotated[float, Range(gt=0)] = 1.0
    """γ, the weight of every distilled sub-network's KD loss (AlphaNet §4.1: the slimmable baseline uses γ =
    the number of sampled sub-networks)."""

    def __post_init__(self) -> None:
        check_ranges(self, "loss")
        if self.kd_loss == "adaptive_alpha" and not self.alpha_minus < self.alpha_plus:
            raise ValueError(f"loss.alpha_minus ({self.alpha_minus}) must be < loss.alpha_plus ({self.alpha_plus})")


KD_LOSSES: dict[str, Callable[[LossConfig], KDLoss]] = {
    "adaptive_alpha": lambda c: AdaptiveAlphaDivergence(c.alpha_minus, c.alpha_plus, c.clip, c.adaptive_choice),
    "alpha": lambda c: AlphaDivergence(c.alpha, c.clip),
    "kl": lambda c: KLDivergence(c.temperature),
    "reverse_kl": lambda c: ReverseKLDivergence(),
    "symmetric_kl": lambda c: SymmetricKLDivergence(),
}


def build_kd_loss(config: LossConfig) -> KDLoss | None:
    """The KD loss named by ``config.kd_loss`` (None for ``none``: no distillation)."""
    return None if config.kd_loss == "none" else KD_LOSSES[config.kd_loss](config)


def build_label_loss(config: LossConfig) -> LabelSmoothingCrossEntropy:
    return LabelSmoothingCrossEntropy(config.label_smoothing)
