"""Small datasets written by the tests themselves (JPEG ImageFolder trees, corrupted shards)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline import DataConfig


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_image_folder(root: Path, classes: int = 3, per_class: int = 12, corrupt: int = 0) -> Path:
    """``root/{train,val}/class_k/*.jpg`` with varied image sizes; ``corrupt`` broken JPEGs in train."""
    for split, count in (("train", per_class), ("val", per_class // 3)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed = hash((split, c, i)) % 10_000
                (folder / f"img{i:03d}.jpg").write_bytes(jpeg_bytes(seed, (36 + 4 * (i % 3), 30 + 2 * (i % 4))))
    for k in range(corrupt):
        (root / "train" / "class_0" / f"broken{k}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 3)
    return root


def rewrite_tar(src: Path, dst: Path, edit) -> None:
    """Copy tar ``src`` to ``dst`` passing each (name, bytes) through ``edit`` (return None to drop)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read()
            result = edit(info.name, data)
            if result is None:
                continue
            out = tarfile.TarInfo(info.name)
            out.size = len(result)
            tout.addfile(out, io.BytesIO(result))


def config(root: Path, fmt: str, **kw) -> DataConfig:
    """The loader tests' data section: small batches, two workers, a mild crop."""
    base = dict(format=fmt, root=root, batch_size=16, num_workers=2, eval_resize=36, crop_scale=(0.3, 1.0))
    base.update(kw)
    return DataConfig(**base)


def all_batches(loader):
    return [(b.images.clone(), b.labels.clone()) for b in loader]


def hostile_jpeg(height: int, width: int, *, progressive: bool = False) -> bytes:
    """A 16×16 JPEG (a few hundred bytes) whose frame header is patched to declare ``height`` × ``width``
    pixels: what a decoder sizes its buffers by."""
    pixels = np.random.default_rng(0).integers(0, 255, size=(16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, progressive=progressive)
    data = bytearray(buffer.getvalue())
    pos = 2
    while data[pos + 1] not in (0xC0, 0xC2):  # walk the marker segments to the frame header
        pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
    data[pos + 5 : pos + 9] = bytes([height >> 8, height & 0xFF, width >> 8, width & 0xFF])
    return bytes(data)
