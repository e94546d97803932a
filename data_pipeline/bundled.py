"""The bundled real dataset: scikit-learn's handwritten digits (shipped inside scikit-learn).

1,797 real 8×8 grayscale scans of the digits 0–9 (UCI optical recognition of handwritten digits),
upscaled to 32×32 RGB with bicubic interpolation.  The train/val split is fixed: a stratified split
with a fixed seed, 300 validation images.  Nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIDE = 32
VAL_SIZE = 300
SPLIT_SEED = 20210215


def load_digits_splits() -> tuple[dict[str, list[tuple[Image.Image, int]]], list[str]]:
    """{"train": [(image, label), ...], "val": [...]} and the class names ("0".."9")."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(int)
    order = np.arange(len(labels))
    train_idx, val_idx = train_test_split(order, test_size=VAL_SIZE, stratify=labels, random_state=SPLIT_SEED)

    def to_image(i: int) -> Image.Image:
        gray = Image.fromarray(pixels[i], mode="L").resize((SIDE, SIDE), Image.Resampling.BICUBIC)
        return gray.convert("RGB")

    splits = {
        "train": [(to_image(i), int(labels[i])) for i in sorted(train_idx)],
        "val": [(to_image(i), int(labels[i])) for i in sorted(val_idx)],
    }
    return splits, [str(c) for c in range(10)]
