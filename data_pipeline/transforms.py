"""Per-sample augmentation on uint8 CHW tensors (torchvision transforms v2), seeded per sample."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import auto_augment_transform
from torch.utils.data import get_worker_info
from torchvision.transforms import v2

from data_pipeline.config import DataConfig
from data_pipeline.jpeg_region import DecodeResizedCrop

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
    if config.auto_augment == "imagenet":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    elif config.auto_augment == "v0":
        steps.append(TFAutoAugmentV0(config))
    return v2.Compose(steps)


def train_decode_transform(config: DataConfig) -> v2.Compose:
    """``train_transform`` from JPEG bytes (1-D uint8): its RandomResizedCrop decodes only the crop's pixels
    (``DecodeResizedCrop``), with the same random draws and the same output.  An image whose header declares
    more than ``config.max_image_pixels`` pixels is refused before decoding."""
    crop, *rest = train_transform(config).transforms
    return v2.Compose([DecodeResizedCrop(crop, config.max_image_pixels), *rest])


def _posterize(image: Image.Image, bits: int, **_) -> Image.Image:
    """Keep ``bits`` most significant bits; 0 bits gives a black image, as in the TF policy (v0 asks for 0
    bits at one magnitude, which current Pillow refuses)."""
    if bits >= 8:
        return image
    if bits <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits)


class TFAutoAugmentV0:
    """The TF/EfficientNet AutoAugment "v0" policy (timm's implementation) on uint8 CHW tensors, with the
    reference's hyper-parameters: translations up to 45 % of the image side, fill with the mean colour."""

    def __init__(self, config: DataConfig):
        mean = tuple(round(255 * m) for m in config.mean)
        hparams = {"translate_const": int(config.base_resolution * 0.45), "img_mean": mean}
        self.policy = auto_augment_transform("v0", hparams)
        for sub_policy in self.policy.policy:
            for op in sub_policy:
                if op.name == "Posterize":
                    op.aug_fn = _posterize

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return v2.functional.pil_to_tensor(self.policy(v2.functional.to_pil_image(image)))

    def __repr__(self) -> str:
        return "TFAutoAugmentV0()"


def eval_transform(config: DataConfig) -> v2.Compose:
    """Resize the short side to ``eval_resize`` (bicubic), centre-crop ``base_resolution``."""
    return v2.Compose(
        [v2.Resize(config.eval_resize, interpolation=BICUBIC, antialias=True), v2.CenterCrop(config.base_resolution)]
    )


def _seed_cpu_rngs(seed: int) -> None:
    # torch.default_generator, not torch.manual_seed: the latter also queues seeds for every accelerator
    # backend and formats a stack trace for each (~80 µs per call, measured; this is ~1 µs).
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def seeded(transform: v2.Compose, image: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply ``transform`` with torch's, Python's and NumPy's global CPU RNGs seeded from ``seed`` (torchvision
    draws from the first, timm's AutoAugment from the others).  In the calling process the RNG states are
    restored afterwards; a data worker's RNGs serve nobody else, so there they are simply reseeded (saving
    and restoring NumPy's state alone costs ~55 µs per image)."""
    if get_worker_info() is not None:
        _seed_cpu_rngs(seed)
        return transform(image)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            _seed_cpu_rngs(seed)
            return transform(image)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
