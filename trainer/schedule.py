"""Learning-rate schedule as a pure function of the global step (no state to save)."""

from __future__ import annotations

import math


def lr_at(
    step: int, *, base_lr: float, total_steps: int, warmup_steps: int, warmup_start_factor: float = 0.001
) -> float:
    """Linear warmup from ``warmup_start_factor × base_lr`` to ``base_lr``, then cosine to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
