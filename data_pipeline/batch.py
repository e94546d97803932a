"""What every loader yields."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class Batch:
    images: torch.Tensor
    """uint8 NCHW at the base resolution (normalised later, on the training device)."""
    labels: torch.Tensor
    """int64 class indices."""
    valid: torch.Tensor
    """bool per sample; False only for eval padding that keeps ranks' batch counts equal."""
    indices: torch.Tensor | None = None
    """int64 index of each sample in its split (what a per-sample cache, e.g. of teacher logits, is keyed by)."""
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    """(shard, key, reason) of samples dropped from this batch because they could not be decoded."""

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return Batch(
            self.images.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.valid.to(device, non_blocking=non_blocking),
            self.indices,
            self.skipped,
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])
