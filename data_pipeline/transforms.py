"""Per-sample augmentation on uint8 CHW tensors (torchvision transforms v2), seeded per sample."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from data_pipeline.config import DataConfig

BICUBIC = v2.InterpolationMode.BICUBIC


def train_transform(config: DataConfig, *, crop: bool = True) -> v2.Compose:
    """RandomResizedCrop (bicubic) → optional flip → optional AutoAugment; ``crop=False`` for FFCV,
    whose decoder already crops and flips."""
    steps: list = []
    if crop:
        steps.append(
            v2.RandomResizedCrop(config.base_resolution, scale=config.crop_scale, interpolation=BICUBIC, antialias=True)
        )
        if config.hflip:
            steps.append(v2.RandomHorizontalFlip())
    if config.auto_augment:
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    return v2.Compose(steps)


def eval_transform(config: DataConfig) -> v2.Compose:
    """Resize the short side to ``eval_resize`` (bicubic), centre-crop ``base_resolution``."""
    return v2.Compose(
        [v2.Resize(config.eval_resize, interpolation=BICUBIC, antialias=True), v2.CenterCrop(config.base_resolution)]
    )


def seeded(transform: v2.Compose, image: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply ``transform`` with torch's RNG seeded to ``seed``, leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)
