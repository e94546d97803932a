"""Label-smoothed cross-entropy for the largest sub-network (the only one that sees labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LabelSmoothingCrossEntropy(nn.Module):
    """Cross-entropy against (1 − ε)·onehot + ε/K over all K classes, averaged over the batch."""

    def __init__(self, smoothing: float = 0.1):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing)

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The same loss per sample (what the distilled sub-networks' label levers weigh)."""
        return F.cross_entropy(logits.float(), target, label_smoothing=self.smoothing, reduction="none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, label_smoothing=self.smoothing)

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}"
