"""Bounds on what a search-space or export file may ask for: a file describes a model in a few bytes, and a
value nothing else bounds (the input resolution is not stored in any weight) would otherwise size the
activations, so that a crafted ``arch.yaml`` could make the trainer allocate without limit."""

from __future__ import annotations

MAX_RESOLUTION = 1024
"""Largest input resolution a search space may list (the paper's spaces stop at 288; ImageNet models rarely go
past 600).  A 16384-pixel resolution asked a tiny network's training step for 103 GB."""


def check_resolutions(resolutions: tuple[int, ...]) -> None:
    """``ValueError`` for a resolution that is not positive or is above ``MAX_RESOLUTION``."""
    bad = [r for r in resolutions if not 0 < r <= MAX_RESOLUTION]
    if bad:
        raise ValueError(f"resolutions {bad} outside 1..{MAX_RESOLUTION} (models.limits.MAX_RESOLUTION)")
