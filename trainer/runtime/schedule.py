"""Learning-rate schedules as pure functions of the global step (no state to save)."""

from __future__ import annotations

import math

from trainer.sections import LRSchedule


def warmup_factor(step: int, warmup_steps: int, start_factor: float) -> float:
    """Linear ramp from ``start_factor`` at step 0 to 1 at ``warmup_steps`` (1 afterwards)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return start_factor + (1.0 - start_factor) * step / warmup_steps


def lr_at(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    warmup_start_factor: float = 0.001,
    schedule: LRSchedule = "warmup_then_cosine",
) -> float:
    """The learning rate of ``step``; both schedules reach 0 at ``total_steps``.

    * ``warmup_then_cosine``: linear warmup from ``warmup_start_factor × base_lr`` to ``base_lr``, then a
      cosine over the remaining ``total_steps − warmup_steps`` steps.
    * ``warmup_times_cosine``: the reference implementation's rule (AttentiveNAS/AlphaNet
      ``WarmupCosineLR``): one cosine over *all* ``total_steps``, multiplied by the warmup factor, so
      the cosine has already started to decay when the warmup ends.
    """
    factor = warmup_factor(step, warmup_steps, warmup_start_factor)
    if schedule == "warmup_times_cosine":
        progress = min(1.0, step / max(1, total_steps))
        return base_lr * factor * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule != "warmup_then_cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    if factor < 1.0:
        return base_lr * factor
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
