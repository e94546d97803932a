"""The loss section of a run config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from losses.registry import check_kd_loss
from typedconfig import Range, check_ranges

AdaptiveChoice = Literal["reference", "exact"]


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """Losses of the sandwich rule: label-smoothed CE for the largest net, a KD loss for the others."""

    kd_loss: str = "adaptive_alpha"
    """KD loss of the distilled sub-networks: a registered name (``losses.kd_loss_names()``; an unknown one is an
    error that lists them); ``none``: every sub-network trains on the label-smoothed CE (the paper's "w/o KD"
    rows)."""
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
        check_kd_loss(self.kd_loss, "loss.kd_loss", none_allowed=True)
        if self.kd_loss == "adaptive_alpha" and not self.alpha_minus < self.alpha_plus:
            raise ValueError(f"loss.alpha_minus ({self.alpha_minus}) must be < loss.alpha_plus ({self.alpha_plus})")
