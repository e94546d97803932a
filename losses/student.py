"""What a distilled sub-network learns: the KD loss against its teacher, and the levers that mix labels in.

Per sample i, with m_i the share of KD:

    loss_i = (1 − m_i) · CE_i + m_i · kd_weight · KD_i,      m_i = ramp(step) · (1 − label_mix) · gate_i

* ``ramp``: 0 → 1 linearly over the first ``warmup_steps`` optimizer steps (labels first, KD ramped in while
  the in-place teacher is still weak); 1 without a warm-up.
* ``label_mix`` γ: the label loss's share once the ramp is done (γ·CE + (1 − γ)·KD).
* ``gate``: ``none`` (1), or ``teacher_correct`` (1 where the teacher's top class is the label, 0 elsewhere: those
  samples learn from the label instead of from a wrong teacher).

Without any lever (the default, and the ImageNet recipes) the loss is exactly ``kd_weight · KD``.  CE is the
label-smoothed cross-entropy of the largest sub-network.  The mean is over the batch.
"""

from __future__ import annotations

import torch

from losses.config import KD_GATES, KDGate
from losses.cross_entropy import LabelSmoothingCrossEntropy
from losses.divergences import KDLoss


class StudentLoss:
    """The distilled sub-networks' loss (see the module docstring)."""

    def __init__(
        self,
        label_loss: LabelSmoothingCrossEntropy,
        kd_loss: KDLoss | None,
        *,
        kd_weight: float = 1.0,
        label_mix: float = 0.0,
        warmup_steps: int = 0,
        gate: KDGate = "none",
    ):
        if not 0.0 <= label_mix <= 1.0:
            raise ValueError(f"label_mix must be in [0, 1], got {label_mix}")
        if gate not in KD_GATES:
            raise ValueError(f"gate must be one of {', '.join(KD_GATES)}, got {gate!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.label_loss, self.kd_loss, self.kd_weight = label_loss, kd_loss, kd_weight
        self.label_mix, self.warmup_steps, self.gate = label_mix, warmup_steps, gate

    @property
    def has_levers(self) -> bool:
        return self.label_mix > 0 or self.warmup_steps > 0 or self.gate != "none"

    def kd_share(self, step: int) -> float:
        """ramp(step) · (1 − label_mix): the KD share of a sample the gate lets through."""
        ramp = 1.0 if step >= self.warmup_steps else step / self.warmup_steps
        return ramp * (1.0 - self.label_mix)

    def __call__(
        self,
        logits: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor,
        step: int,
        metrics: dict | None = None,
        name: str = "",
    ) -> torch.Tensor:
        if self.kd_loss is None:
            return self.label_loss(logits, labels)
        if metrics is not None:
            metrics[f"kd_div/{name}"] = self.kd_loss.divergence(logits.detach(), teacher).mean()
        if not self.has_levers:
            loss = self.kd_loss(logits, teacher)
            return loss if self.kd_weight == 1.0 else self.kd_weight * loss
        share = logits.new_full((logits.shape[0],), self.kd_share(step), dtype=torch.float32)
        if self.gate == "teacher_correct":
            share = share * (teacher.argmax(dim=1) == labels).float()
        if metrics is not None:
            metrics[f"kd_share/{name}"] = share.mean().detach()
        loss = (1.0 - share) * self.label_loss.per_sample(logits, labels)
        if bool((share > 0).any()):
            loss = loss + share * self.kd_weight * self.kd_loss.per_sample_loss(logits, teacher)
        return loss.mean()
