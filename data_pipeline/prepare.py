"""Convert an ImageFolder tree, Fashion-MNIST or the bundled digits into WebDataset shards and/or FFCV ``.beton`` files.

    python -m data_pipeline.prepare --source digits --out data/digits
    python -m data_pipeline.prepare --source fashion-mnist --train-per-class 1000 --out data/fashion-mnist-1k
    python -m data_pipeline.prepare --source /datasets/imagenet --out data/imagenet --formats webdataset ffcv

``fashion-mnist`` reads the four IDX files of Debian's package ``dataset-fashion-mnist``
(``fashion-mnist:DIR``: from DIR); the official test split becomes ``val``.  An ImageFolder source is ``root/class/*.jpg`` (one split, ``--split``) or ``root/{train,val}/class/*.jpg``.
Output: ``{split}-{index:06d}.tar`` shards (samples ``key.jpg`` + ``key.cls``), ``{split}.beton``,
and ``manifest.json`` (counts per split and class, class names, files with sizes and sha256).
Everything is written under temporary names and renamed into place; the manifest is written last,
so an interrupted run never leaves output that looks complete, and re-running on finished output is
a no-op.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from data_pipeline.config import MAX_IMAGE_PIXELS
from data_pipeline.image_header import declared_jpeg_size
from data_pipeline.manifest import MANIFEST, MANIFEST_VERSION, is_complete, manifest_path, read_manifest, write_manifest
from fileops import atomic_output, fsync_dir, temp_path_for

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
FFCV_IMAGE_MODES = ("jpg", "raw")
"""How a ``.beton`` stores images (FFCV's ``write_mode``)."""


class OversizedImageError(ValueError):
    """An image file whose header declares more pixels than the bound (``--max-image-pixels``)."""


def check_pixels(height: int, width: int, max_pixels: int) -> None:
    """``OversizedImageError`` when a header declares more than ``max_pixels`` pixels: a decoder allocates by
    the declared size, whatever the file's."""
    if width * height > max_pixels:
        raise OversizedImageError(
            f"declares {width}x{height} pixels, more than --max-image-pixels ({max_pixels:,}); not decoded"
        )


@dataclass(slots=True)
class Sample:
    key: str
    label: int
    path: Path | None = None
    image: Image.Image | None = None

    def jpeg_bytes(self, quality: int, max_pixels: int = MAX_IMAGE_PIXELS) -> bytes:
        """Original bytes of a JPEG file, once the size its header declares passed ``max_pixels`` (nothing is
        decoded: a file without a frame header is stored as it is, and the loader skips it); anything else is
        encoded as JPEG."""
        if self.path is not None and self.path.suffix.lower() in (".jpg", ".jpeg"):
            data = self.path.read_bytes()
            if not data:
                raise ValueError("empty file")
            size = declared_jpeg_size(data)
            if size is not None:
                check_pixels(*size, max_pixels)
            return data
        buffer = io.BytesIO()
        self.load(max_pixels).save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()

    def load(self, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
        """The image as 8-bit RGB, decoded only once the size its header declares passed ``max_pixels`` (read
        by our JPEG header walk, before PIL's own, larger, bomb check; PIL's header parser for other formats)."""
        if self.image is not None:
            return self.image
        data = self.path.read_bytes()
        size = declared_jpeg_size(data)
        if size is not None:
            check_pixels(*size, max_pixels)
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            check_pixels(*img.size[::-1], max_pixels)
            return to_rgb8(img)

    def where(self) -> str:
        """The file (or, for a built-in source, the key) for messages."""
        return str(self.path) if self.path is not None else self.key


def _skip_record(sample: Sample, exc: Exception) -> dict:
    return {"key": sample.key, "path": sample.where(), "reason": f"{type(exc).__name__}: {exc}"}


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB.  16-bit grayscale (``I;16*``, or ``I`` holding values above 255) is scaled by 1/257 first:
    PIL's own conversion clips it, which turns almost every 16-bit image white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        img = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


class Source:
    """Splits of samples with integer labels and class names."""

    def __init__(
        self, splits: dict[str, list[Sample]], classes: list[str], description: str, refused: list[dict] | None = None
    ):
        self.splits = splits
        self.classes = classes
        self.description = description
        self.refused = refused or []
        """Files left out on purpose (``{"path", "reason"}``), e.g. symlinks that leave the source tree."""


def digits_source() -> Source:
    from data_pipeline.bundled import load_digits_splits

    raw, classes = load_digits_splits()
    splits = {
        name: [Sample(key=f"{name}{i:05d}", label=label, image=image) for i, (image, label) in enumerate(items)]
        for name, items in raw.items()
    }
    return Source(splits, classes, "bundled scikit-learn digits (32x32 RGB)")


def fashion_mnist_source(folder: Path | None, train_per_class: int | None) -> Source:
    from data_pipeline.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist

    folder = folder or FASHION_MNIST_DIR
    splits = {
        name: [
            Sample(key=f"{name}{i:05d}", label=int(label), image=Image.fromarray(image, mode="L").convert("RGB"))
            for i, (image, label) in enumerate(zip(images, labels, strict=True))
        ]
        for name, (images, labels) in load_fashion_mnist(folder, train_per_class).items()
    }
    per_class = "" if train_per_class is None else f", first {train_per_class} training images per class"
    return Source(splits, FASHION_MNIST_CLASSES, f"Fashion-MNIST IDX files in {folder}{per_class} (28x28 grey as RGB)")


def open_source(source_name: str, split: str, train_per_class: int | None = None) -> Source:
    """``digits``, ``fashion-mnist[:DIR]`` or an ImageFolder root."""
    if train_per_class is not None and not source_name.startswith("fashion-mnist"):
        raise ValueError("--train-per-class applies to --source fashion-mnist only")
    if source_name == "digits":
        return digits_source()
    if source_name == "fashion-mnist" or source_name.startswith("fashion-mnist:"):
        folder = source_name.partition(":")[2]
        return fashion_mnist_source(Path(folder) if folder else None, train_per_class)
    return image_folder_source(Path(source_name), split)


def _safe_key(text: str) -> str:
    # WebDataset groups members by the part of the name before the first dot: keys must not contain dots.
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _class_folder(root: Path, split: str, classes: list[str], tree: Path, refused: list[dict]) -> list[Sample]:
    """The images of ``root/class/`` for every class.  Keys are the safe form of split, class and file stem,
    made unique with a hash of the file's relative path where two files map to the same key (``x y`` and
    ``x_y``, or ``a.jpg`` and ``a.png``).  A file that resolves outside ``tree`` (a symlink) is refused."""
    samples, used = [], set()
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if not (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES):
                continue
            relative = path.relative_to(tree).as_posix()
            if not path.resolve().is_relative_to(tree):
                refused.append({"path": relative, "reason": f"resolves outside the source tree ({path.resolve()})"})
                continue
            key = _safe_key(f"{split}_{name}_{path.stem}")
            if key in used:
                key = f"{key}-{hashlib.sha1(relative.encode()).hexdigest()[:12]}"
            used.add(key)
            samples.append(Sample(key=key, label=label, path=path))
    return samples


def image_folder_source(root: Path, split: str) -> Source:
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder root {root} does not exist")
    split_dirs = [d for d in ("train", "val") if (root / d).is_dir()]
    roots = {d: root / d for d in split_dirs} if split_dirs else {split: root}
    first = next(iter(roots.values()))
    classes = sorted(d.name for d in first.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"no class folders under {first}")
    for name, split_root in roots.items():
        have = sorted(d.name for d in split_root.iterdir() if d.is_dir())
        if have != classes:
            raise ValueError(f"split '{name}' has classes {have}, expected {classes}")
    tree, refused = root.resolve(), []
    splits = {name: _class_folder(split_root, name, classes, tree, refused) for name, split_root in roots.items()}
    empty = [name for name, samples in splits.items() if not samples]
    if empty:
        raise ValueError(f"no images under {root} for split(s) {empty} (suffixes {sorted(IMAGE_SUFFIXES)})")
    return Source(splits, classes, f"ImageFolder {root}", refused)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_entry(path: Path, **extra) -> dict:
    return {"name": path.name, "size": path.stat().st_size, "sha256": sha256_of(path), **extra}


def write_webdataset(
    samples: list[Sample],
    out: Path,
    split: str,
    shard_mb: float,
    quality: int,
    progress,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[list[dict], list[dict]]:
    """Write ``{split}-%06d.tar`` shards of about ``shard_mb`` MB into ``out`` (via a temp folder); return
    the shard entries and the samples skipped because they could not be encoded or declare more than
    ``max_pixels`` pixels (JPEGs are stored as they are and decoded only when loaded)."""
    import webdataset as wds

    tmp = temp_path_for(out / f"{split}-webdataset")  # a folder: ShardWriter names the files itself
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts: Counter = Counter()
    skipped: list[dict] = []
    task = progress.add_task(f"{split}: webdataset", total=len(samples))
    try:
        with wds.ShardWriter(
            str(tmp / f"{split}-%06d.tar"), maxsize=int(shard_mb * 1e6), maxcount=10**9, verbose=0
        ) as sink:
            for sample in samples:
                progress.advance(task)
                try:
                    jpeg = sample.jpeg_bytes(quality, max_pixels)
                except Exception as exc:  # PIL raises many types (0-byte file, decompression bomb, ...)
                    skipped.append(_skip_record(sample, exc))
                    continue
                sink.write({"__key__": sample.key, "jpg": jpeg, "cls": str(sample.label).encode()})
                counts[Path(sink.fname).name] += 1
        shards = []
        for path in sorted(tmp.glob("*.tar")):
            final = out / path.name
            os.replace(path, final)
            shards.append(_file_entry(final, count=counts[path.name]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(out)
    return shards, skipped


def write_ffcv(
    samples: list[Sample],
    out: Path,
    split: str,
    max_side: int,
    quality: int,
    workers: int,
    progress,
    images: str = "jpg",
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[dict, list[dict]]:
    """Write ``{split}.beton``; images that fail to decode or declare more than ``max_pixels`` pixels are
    skipped and returned as such.  ``images``: FFCV's write mode, ``jpg`` (decoded by every read) or ``raw``
    (pixels, no decode; ~12× the size)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from tqdm import tqdm

    task = progress.add_task(f"{split}: ffcv (decode check)", total=len(samples))
    good, skipped = [], []
    for sample in samples:
        try:
            sample.load(max_pixels).load()
            good.append(sample)
        except Exception as exc:  # PIL raises many types for broken files
            skipped.append(_skip_record(sample, exc))
        progress.advance(task)

    class Indexed:
        def __len__(self) -> int:
            return len(good)

        def __getitem__(self, i: int):
            return good[i].load(max_pixels), good[i].label

    final = out / f"{split}.beton"
    fields = {
        "image": RGBImageField(write_mode=images, max_resolution=max_side, jpeg_quality=quality),
        "label": IntField(),
    }
    # FFCV draws its own tqdm bar: under --quiet, hand it a tqdm that is switched off.
    quiet_bar = mock.patch("ffcv.writer.tqdm", functools.partial(tqdm, disable=True))
    with atomic_output(final) as tmp, quiet_bar if progress.disable else contextlib.nullcontext():
        DatasetWriter(str(tmp), fields, num_workers=max(1, workers)).from_indexed_dataset(Indexed(), chunksize=64)
    return _file_entry(final, count=len(good)), skipped


def prepare(
    source_name: str,
    out: Path,
    formats: list[str],
    split: str = "train",
    shard_mb: float = 64.0,
    max_side: int = 512,
    quality: int = 90,
    workers: int = 2,
    quiet: bool = False,
    ffcv_images: str = "jpg",
    train_per_class: int | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> dict:
    """Write the dataset and its manifest; return the manifest (the existing one when already done).  Images
    whose header declares more than ``max_image_pixels`` pixels are skipped (listed in the manifest), never
    decoded."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if ffcv_images not in FFCV_IMAGE_MODES:
        raise ValueError(f"ffcv_images must be one of {', '.join(FFCV_IMAGE_MODES)}, not {ffcv_images!r}")
    options = {"source": str(source_name), "shard_mb": shard_mb, "max_side": max_side, "jpeg_quality": quality}
    if ffcv_images != "jpg":  # only when set, so that datasets prepared before the option still match
        options["ffcv_images"] = ffcv_images
    if max_image_pixels < 1:
        raise ValueError(f"--max-image-pixels must be at least 1, got {max_image_pixels}")
    if max_image_pixels != MAX_IMAGE_PIXELS:  # only when set, as ffcv_images
        options["max_image_pixels"] = max_image_pixels
    if train_per_class is not None:
        if train_per_class < 1:
            raise ValueError(f"--train-per-class must be at least 1, got {train_per_class}")
        options["train_per_class"] = train_per_class
    if is_complete(out, formats, options):
        if not quiet:
            print(f"{out}: already prepared ({MANIFEST} matches), nothing to do")
        return read_manifest(out)
    source = open_source(source_name, split, train_per_class)
    out.mkdir(parents=True, exist_ok=True)
    # The manifest goes first: until the new one is written, the folder is not a finished dataset (an
    # interrupted rerun must not leave the old manifest describing a mix of old and new shards).
    manifest_path(out).unlink(missing_ok=True)
    fsync_dir(out)
    manifest = {
        "version": MANIFEST_VERSION,
        "source": source.description,
        "options": options,
        "formats": sorted(formats),
        "classes": source.classes,
        "refused": source.refused,
        "splits": {},
    }
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=quiet) as progress:
        for name, samples in source.splits.items():
            per_class = Counter(source.classes[s.label] for s in samples)
            entry: dict = {"count": len(samples), "per_class": dict(sorted(per_class.items()))}
            if "webdataset" in formats:
                shards, entry["webdataset_skipped"] = write_webdataset(
                    samples, out, name, shard_mb, quality, progress, max_image_pixels
                )
                entry["webdataset"] = {"shards": shards}
            if "ffcv" in formats:
                entry["ffcv"], entry["ffcv_skipped"] = write_ffcv(
                    samples, out, name, max_side, quality, workers, progress, ffcv_images, max_image_pixels
                )
            manifest["splits"][name] = entry
    write_manifest(out, manifest)
    if not quiet:
        for name, entry in manifest["splits"].items():
            shards = len(entry.get("webdataset", {}).get("shards", []))
            skipped = max(len(entry.get("ffcv_skipped", [])), len(entry.get("webdataset_skipped", [])))
            print(
                f"{name}: {entry['count']} images, {shards} shard(s)"
                + (f", {skipped} undecodable skipped (listed in {MANIFEST})" if skipped else "")
            )
            listed = {s["key"]: s for s in entry.get("webdataset_skipped", []) + entry.get("ffcv_skipped", [])}
            for item in list(listed.values())[:20]:
                print(f"  skipped {item.get('path', item['key'])}: {item['reason']}")
        for item in source.refused:
            print(f"refused {item['path']}: {item['reason']}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        default="digits",
        help="'digits' (bundled), 'fashion-mnist[:DIR]' (IDX files; default DIR: Debian's "
        "/usr/share/datasets/fashion-mnist) or an ImageFolder root",
    )
    parser.add_argument(
        "--train-per-class",
        type=int,
        help="fashion-mnist: keep the first N training images of each class (the test split stays whole)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--formats", nargs="+", choices=["webdataset", "ffcv"], default=["webdataset", "ffcv"])
    parser.add_argument("--split", default="train", help="split name of a flat ImageFolder root")
    parser.add_argument("--shard-mb", type=float, default=64.0, help="target WebDataset shard size in MB")
    parser.add_argument("--max-side", type=int, default=512, help="FFCV: longest side stored")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument(
        "--ffcv-images",
        choices=FFCV_IMAGE_MODES,
        default="jpg",
        help="FFCV: store JPEGs (decoded at every read) or raw pixels (no decode; about 12x the disk of ~500x375 JPEGs)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=MAX_IMAGE_PIXELS,
        help=f"skip images whose header declares more pixels (height x width) than this (default {MAX_IMAGE_PIXELS:,}: "
        "8192x8192); the loader's data.max_image_pixels bounds them again",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        prepare(
            args.source,
            args.out,
            args.formats,
            args.split,
            args.shard_mb,
            args.max_side,
            args.jpeg_quality,
            args.workers,
            args.quiet,
            args.ffcv_images,
            args.train_per_class,
            args.max_image_pixels,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
