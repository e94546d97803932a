"""The data section of a run config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the prepared dataset lives and how batches are made from it."""

    format: Literal["webdataset", "ffcv"] = "webdataset"
    """Storage format written by ``python -m data_pipeline.prepare``."""
    root: Path = Path("data/digits")
    """Prepared dataset folder (holds ``manifest.json`` and the shards / ``.beton`` files)."""
    train_split: str = "train"
    val_split: str = "val"
    base_resolution: int = 32
    """Side of the square crops the loader produces; each sub-network rescales them on the device."""
    batch_size: int = 64
    """Images per rank per micro-batch."""
    num_workers: int = 2
    """DataLoader worker processes (WebDataset) or decoding threads (FFCV)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area range of RandomResizedCrop (bicubic)."""
    hflip: bool = True
    """Random horizontal flips during training (off for digits-like data where it changes meaning)."""
    auto_augment: bool = False
    """torchvision AutoAugment (ImageNet policy) during training."""
    eval_resize: int = 36
    """Eval transform: resize the short side to this (bicubic), then centre-crop ``base_resolution``."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel mean (on the 0–1 scale) used by normalisation on the training device."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.base_resolution < 8:
            raise ValueError(f"data.base_resolution must be >= 8, got {self.base_resolution}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"data.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.eval_resize < self.base_resolution:
            raise ValueError(
                f"data.eval_resize ({self.eval_resize}) must be >= data.base_resolution ({self.base_resolution})"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"data.std must be positive, got {self.std}")
