"""Fashion-MNIST from its four original IDX files (no download: Debian's ``dataset-fashion-mnist`` installs them).

IDX (LeCun's MNIST format): a big-endian header, then raw bytes.  Images: magic 2051, count, rows, cols, then
count·rows·cols unsigned bytes; labels: magic 2049, count, then count bytes.  Files may be gzipped (``.gz``),
as Debian ships them.  Hand-written because numpy reads the format in a few lines and no well-kept package on
PyPI reads IDX without also downloading.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's package ``dataset-fashion-mnist`` puts the files."""
FASHION_MNIST_CLASSES = [
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""Our split name → (images, labels) file stems; ``val`` is the official test split."""
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def _read_bytes(path: Path) -> bytes:
    with path.open("rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        return f.read()


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The array of an IDX file: (count, rows, cols) uint8 for images (magic 2051), (count,) for labels (2049)."""
    data = _read_bytes(path)
    dims = 3 if magic == IMAGES_MAGIC else 1
    header = 4 + 4 * dims
    if len(data) < header:
        raise ValueError(f"{path}: {len(data)} bytes, too short for an IDX header")
    found, *shape = struct.unpack(f">{1 + dims}I", data[:header])
    if found != magic:
        raise ValueError(f"{path}: IDX magic {found}, expected {magic} ({'images' if dims == 3 else 'labels'})")
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes), file holds {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"{folder / stem}[.gz] not found: Fashion-MNIST's IDX files are installed by Debian's package "
        f"dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist, into {FASHION_MNIST_DIR}); "
        "or give their folder: --source fashion-mnist:DIR"
    )


def load_fashion_mnist(
    folder: Path = FASHION_MNIST_DIR, train_per_class: int | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images, labels), "val": (images, labels)}: the official split; ``train_per_class`` keeps the
    first N training images of each class in file order (the test split stays whole)."""
    if not folder.is_dir():
        _find(folder, FASHION_MNIST_FILES["train"][0])  # raises the how-to-install error
    splits = {}
    for split, (image_stem, label_stem) in FASHION_MNIST_FILES.items():
        images = read_idx(_find(folder, image_stem), IMAGES_MAGIC)
        labels = read_idx(_find(folder, label_stem), LABELS_MAGIC)
        if len(images) != len(labels):
            raise ValueError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{folder}: {split} has label {labels.max()}, expected 0–9")
        if split == "train" and train_per_class is not None:
            keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:train_per_class] for c in range(10)]))
            images, labels = images[keep], labels[keep]
        splits[split] = (images, labels)
    return splits
