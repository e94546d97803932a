"""Transforms run on the training device: multi-resolution bicubic rescaling and normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def rescale(batch: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize an NCHW batch to ``resolution``² with bicubic interpolation on its own device.

    A no-op (the same tensor) when the batch already has that size.  Integer batches are resized in
    float32 and returned as float32.
    """
    if batch.ndim != 4:
        raise ValueError(f"expected an NCHW batch, got shape {tuple(batch.shape)}")
    if batch.shape[-2:] == (resolution, resolution):
        return batch
    if not batch.is_floating_point():
        batch = batch.float()
    return F.interpolate(batch, size=(resolution, resolution), mode="bicubic", align_corners=False)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (0–255) or float (0–1) NCHW → float32 ``(x − mean) / std`` per channel, contiguous: a batch
    that came channels-last (as WebDataset workers stack it, with a plain copy per image) changes layout in
    the conversion to float it needs anyway, and ``rescale`` runs on NCHW (on a CPU twice as fast as on
    channels-last)."""
    x = images.to(torch.float32, memory_format=torch.contiguous_format)
    x = x / 255.0 if images.dtype == torch.uint8 else x
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t
