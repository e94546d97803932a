"""The data section of a run config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from typedconfig import Range, check_ranges

MAX_IMAGE_PIXELS = 8192 * 8192
"""Default bound on the pixels an image's header may declare (64 Mpx: 192 MiB of RGB once decoded); a JPEG
decoder sizes its buffers by the header, not by the file, so a few kilobytes can otherwise ask for gigabytes."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the prepared dataset lives and how batches are made from it."""

    format: Literal["webdataset", "ffcv"] = "webdataset"
    """Storage format written by ``python -m data_pipeline.prepare``."""
    root: Path = Path("data/digits")
    """Prepared dataset folder (holds ``manifest.json`` and the shards / ``.beton`` files)."""
    train_split: str = "train"
    val_split: str = "val"
    base_resolution: Annotated[int, Range(ge=8)] = 32
    """Side of the square crops the loader produces; each sub-network rescales them on the device."""
    batch_size: Annotated[int, Range(ge=1)] = 64
    """Images per rank per micro-batch."""
    num_workers: Annotated[int, Range(ge=0)] = 2
    """DataLoader worker processes (WebDataset) or decoding threads (FFCV)."""
    crop_scale: Annotated[tuple[float, float], Range(gt=0, le=1)] = (0.08, 1.0)
    """Area range of RandomResizedCrop (bicubic)."""
    hflip: bool = True
    """Random horizontal flips during training (off for digits-like data where it changes meaning)."""
    auto_augment: Literal["none", "imagenet", "v0"] = "none"
    """AutoAugment during training: ``v0`` is the TF/EfficientNet policy the reference trains with (timm's
    implementation, mean-colour fill); ``imagenet`` is torchvision's ImageNet policy (fill 0)."""
    eval_resize: Annotated[int, Range(ge=8)] = 36
    """Eval transform: resize the short side to this (bicubic), then centre-crop ``base_resolution``."""
    max_image_pixels: Annotated[int, Range(ge=1)] = MAX_IMAGE_PIXELS
    """Images whose header declares more pixels (height × width) than this are skipped, not decoded (and
    reported with the epoch's skipped samples); ``prepare --max-image-pixels`` applies the same bound."""
    verify: Literal["background", "start", "never"] = "background"
    """Check every data file's sha256 against the manifest (sizes are always checked at start):
    ``background`` hashes while training runs (a mismatch stops the run at the next step; a checkpoint is
    committed only once the hashes passed), ``start`` hashes before the first step, ``never`` not at all."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel mean (on the 0–1 scale) used by normalisation on the training device."""
    std: Annotated[tuple[float, float, float], Range(gt=0)] = (0.229, 0.224, 0.225)
    """Per-channel standard deviation (on the 0–1 scale) of the same normalisation."""

    def preprocessing(self, resolution: int) -> dict:
        """What a network trained on this data expects, in the order to apply it (written into exports)."""
        return {
            "color": "RGB",
            "resize_short_side": self.eval_resize,
            "center_crop": self.base_resolution,
            "resize_to": resolution,
            "interpolation": "bicubic",
            "scale": "divide 8-bit values by 255",
            "mean": list(self.mean),
            "std": list(self.std),
            "input_size": [3, resolution, resolution],
        }

    def __post_init__(self) -> None:
        check_ranges(self, "data")
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"data.crop_scale must be (low, high) with low <= high, got {self.crop_scale}")
        if self.eval_resize < self.base_resolution:
            raise ValueError(
                f"data.eval_resize ({self.eval_resize}) must be >= data.base_resolution ({self.base_resolution})"
            )
