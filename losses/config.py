"""The loss section of a run config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, get_args

from losses.registry import check_kd_loss
from typedconfig import Range, check_ranges

AdaptiveChoice = Literal["reference", "exact"]
KDGate = Literal["none", "teacher_correct"]
KD_GATES = get_args(KDGate)


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

    kd_warmup_epochs: Annotated[float, Range(ge=0)] = 0.0
    """Sandwich task: over the first W epochs the distilled sub-networks' loss moves linearly from the label
    loss to the KD loss (labels first, while the in-place teacher is weak); 0: KD from the first step."""
    kd_label_mix: Annotated[float, Range(ge=0, le=1)] = 0.0
    """Sandwich task: γ, the label loss's share of every distilled sub-network's loss, γ·CE + (1−γ)·KD."""
    kd_gate: KDGate = "none"
    """Sandwich task: ``teacher_correct``: a sample whose teacher's top class is not its label learns from the
    label instead (``losses/student.py``); ``none``: every sample learns from the teacher."""

    def __post_init__(self) -> None:
        check_ranges(self, "loss")
        check_kd_loss(self.kd_loss, "loss.kd_loss", none_allowed=True)
        if self.kd_gate not in KD_GATES:
            raise ValueError(f"loss.kd_gate must be one of {', '.join(KD_GATES)}, got {self.kd_gate!r}")
        if self.kd_loss == "adaptive_alpha" and not self.alpha_minus < self.alpha_plus:
            raise ValueError(f"loss.alpha_minus ({self.alpha_minus}) must be < loss.alpha_plus ({self.alpha_plus})")
