"""The JPEG region decoder: the pixels of a full decode, for every layout of JPEG file; the train crop drawn
before decoding gives the same tensors as torchvision's RandomResizedCrop of the decoded image."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from data_pipeline import DataConfig, jpeg_region
from data_pipeline.config import MAX_IMAGE_PIXELS
from data_pipeline.jpeg_region import (
    DecodeResizedCrop,
    OversizedImage,
    UndecodableImage,
    declared_size,
    decode_region,
    decode_rgb,
    image_size,
)
from data_pipeline.transforms import seeded, train_decode_transform, train_transform

# (PIL subsampling: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0), progressive, greyscale
LAYOUTS = {
    "4:2:0": {"subsampling": 2},
    "4:2:2": {"subsampling": 1},
    "4:4:4": {"subsampling": 0},
    "progressive 4:2:0": {"subsampling": 2, "progressive": True},
    "greyscale": {"grey": True},
}


def encode(pixels: np.ndarray, grey: bool = False, **options) -> torch.Tensor:
    image = Image.fromarray(pixels)
    if grey:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def photo(height: int, width: int, noise: bool) -> np.ndarray:
    """A photograph's corner (smooth areas and edges), or noise, which makes any wrong pixel show."""
    if noise:
        return np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return np.ascontiguousarray(photos.astronaut()[:height, :width])


def rectangles(height: int, width: int, count: int, seed: int):
    """Random rectangles plus the corner cases: the whole image, single pixels at the corners, edge strips."""
    yield from [(0, 0, height, width), (0, 0, 1, 1), (height - 1, width - 1, 1, 1), (0, width - 1, height, 1)]
    yield from [(height - 1, 0, 1, width), (5, 17, height - 5, width - 17)]
    rng = np.random.default_rng(seed)
    for _ in range(count):
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        yield int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w


def test_the_compiled_decoder_is_installed():
    assert jpeg_region.available(), "data_pipeline._jpeg_region was not built: run `make setup`"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("noise", [False, True], ids=["photo", "noise"])
def test_a_region_has_the_pixels_of_the_full_decode(layout, noise):
    height, width = 203, 341  # not multiples of the 8/16-pixel blocks
    jpeg = encode(photo(height, width, noise), **LAYOUTS[layout])
    full = decode_jpeg(jpeg, mode=ImageReadMode.RGB)
    assert image_size(jpeg) == (height, width)
    for top, left, h, w in rectangles(height, width, count=40, seed=len(layout)):
        region = decode_region(jpeg, top, left, h, w)
        assert region is not None and region.shape == (3, h, w)
        assert torch.equal(region, full[:, top : top + h, left : left + w]), (layout, top, left, h, w)


def test_rectangles_outside_the_image_are_refused():
    jpeg = encode(photo(40, 50, noise=False))
    for top, left, h, w in [(-1, 0, 5, 5), (0, 0, 41, 5), (0, 46, 5, 5), (0, 0, 0, 5), (35, 45, 6, 5)]:
        assert decode_region(jpeg, top, left, h, w) is None


@pytest.mark.parametrize("layout", ["4:2:0", "greyscale"])
def test_the_train_crop_is_torchvision_s_random_resized_crop_of_the_decoded_image(layout):
    jpeg = encode(photo(375, 500, noise=False), **LAYOUTS[layout])
    crop = v2.RandomResizedCrop(64, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    decoded = decode_jpeg(jpeg, mode=ImageReadMode.RGB)
    compose = v2.Compose([crop])
    for seed in range(30):
        expected = seeded(compose, decoded, seed)
        assert torch.equal(seeded(v2.Compose([DecodeResizedCrop(crop)]), jpeg, seed), expected), seed


def test_the_train_transform_from_bytes_equals_the_one_on_decoded_images():
    """Crop, flip and AutoAugment draw in the same order, so the whole transform gives the same tensors."""
    config = DataConfig(base_resolution=48, eval_resize=56, auto_augment="v0")
    jpeg = encode(photo(120, 160, noise=False))
    decoded = decode_jpeg(jpeg, mode=ImageReadMode.RGB)
    on_images, on_bytes = train_transform(config), train_decode_transform(config)
    for seed in range(20):
        expected = seeded(on_images, decoded, seed)
        assert torch.equal(seeded(on_bytes, jpeg, seed), expected), seed


def test_files_the_region_decoder_refuses_take_the_full_decoder_s_path():
    """CMYK (libjpeg cannot convert it to RGB) and a file cut short (libjpeg would warn and fill in grey):
    decode_jpeg decides what they give; bytes that are no JPEG raise UndecodableImage."""
    crop = v2.RandomResizedCrop(32, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    pixels = photo(90, 120, noise=False)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(buffer, format="JPEG", quality=90)
    cmyk = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    whole = encode(pixels)
    cut = whole[: whole.numel() * 2 // 3].clone()
    for jpeg in (cmyk, cut):
        assert decode_region(jpeg, 0, 0, 90, 120) is None
        try:
            expected = seeded(v2.Compose([crop]), decode_jpeg(jpeg, mode=ImageReadMode.RGB), 7)
        except RuntimeError:
            with pytest.raises(UndecodableImage):
                seeded(v2.Compose([DecodeResizedCrop(crop)]), jpeg, 7)
        else:
            assert torch.equal(seeded(v2.Compose([DecodeResizedCrop(crop)]), jpeg, 7), expected)
    garbage = torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0 this is not a jpeg" * 3), dtype=torch.uint8)
    assert image_size(garbage) is None
    with pytest.raises(UndecodableImage):
        DecodeResizedCrop(crop)(garbage)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ffcv_s_region_decode_has_the_pixels_of_ffcv_s_full_decode(layout):
    """The FFCV decoder (numba-compiled, fast inverse DCT) decodes only the crop; FFCV's own decoder decodes
    everything: same pixels for the crop.  (tests/data_pipeline/test_data_loader.py checks whole batches against FFCV's
    primitives.)"""
    from ffcv.libffcv import imdecode
    from numba import njit

    from data_pipeline.jpeg_region import decode_region_into, region_decoder_for_numba

    assert region_decoder_for_numba() is decode_region_into
    height, width = 203, 341
    jpeg = encode(photo(height, width, noise=True), **LAYOUTS[layout]).numpy()
    full = np.empty((height, width, 3), dtype=np.uint8)
    assert imdecode(jpeg, full, height, width, height, width, 0, 0, 1, 1, False, False) == 0
    region_into = njit(decode_region_into)
    scratch = np.empty(height * width * 3, dtype=np.uint8)  # what FFCV's pipeline gives each sample
    for top, left, h, w in rectangles(height, width, count=25, seed=7):
        assert region_into(jpeg, scratch, top, left, h, w, MAX_IMAGE_PIXELS) == 0
        region = scratch[: h * w * 3].reshape(h, w, 3)
        assert np.array_equal(region, full[top : top + h, left : left + w]), (layout, top, left, h, w)
    assert (
        region_into(jpeg[: jpeg.size // 2].copy(), scratch, 0, 0, height, width, MAX_IMAGE_PIXELS) != 0
    )  # cut: FFCV decodes it


def test_the_webdataset_loader_gives_the_batches_of_the_full_decode(digits_shards, monkeypatch):
    """End to end, in the loader's worker processes: the same batches with the region decoder as without it
    (the extension switched off: every image decoded whole, then torchvision's crop)."""
    from data_pipeline import build_loader

    config = DataConfig(
        format="webdataset",
        root=digits_shards,
        base_resolution=24,
        batch_size=16,
        num_workers=2,
        eval_resize=28,
        crop_scale=(0.3, 1.0),
        auto_augment="v0",
    )

    def first_batches(count=6):
        loader = build_loader(config, "train", train=True, seed=11)
        batches = []
        for batch in loader:
            batches.append((batch.images.clone(), batch.labels.clone()))
            if len(batches) == count:
                break
        loader.close()
        return batches

    cropped_only = first_batches()
    monkeypatch.setattr(jpeg_region, "_LIBRARY", None)
    assert image_size(encode(photo(16, 16, noise=False))) is None
    whole = first_batches()
    for (images, labels), (expected_images, expected_labels) in zip(cropped_only, whole, strict=True):
        assert torch.equal(labels, expected_labels) and torch.equal(images, expected_images)


def test_damaged_files_fail_as_they_fail_a_full_decode():
    """Bytes flipped, inserted, deleted or cut off (in a seeded sweep of 600 damaged files): the region
    decoder never crashes, and it returns pixels only for files that torchvision's full decoder also decodes,
    and then the same pixels — so a damaged file is skipped and reported as before, even when the damage lies
    outside the crop (the region decoder reads every file to its end)."""
    import warnings

    rng = np.random.default_rng(0)
    sources = [encode(photo(97, 131, noise=False), **LAYOUTS[name]).numpy().tobytes() for name in LAYOUTS]
    decoded = refused = 0
    for attempt in range(600):
        damaged = bytearray(sources[attempt % len(sources)])
        kind = attempt % 4
        if kind == 0:  # flipped bytes
            for _ in range(int(rng.integers(1, 8))):
                damaged[int(rng.integers(0, len(damaged)))] = int(rng.integers(0, 256))
        elif kind == 1:  # cut off
            damaged = damaged[: int(rng.integers(1, len(damaged)))]
        elif kind == 2:  # bytes inserted
            at = int(rng.integers(0, len(damaged)))
            damaged[at:at] = rng.integers(0, 256, int(rng.integers(1, 50)), dtype=np.uint8).tobytes()
        else:  # bytes deleted
            at = int(rng.integers(0, len(damaged) - 10))
            del damaged[at : at + int(rng.integers(1, 10))]
        jpeg = torch.frombuffer(damaged, dtype=torch.uint8)
        size = image_size(jpeg)
        if size is None or not 0 < size[0] * size[1] <= 10**6:
            continue
        height, width = size
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        region = decode_region(jpeg, top, left, h, w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                full = decode_jpeg(jpeg, mode=ImageReadMode.RGB)
            except RuntimeError:
                full = None
        if region is None:
            refused += 1
            continue
        decoded += 1
        assert full is not None, (attempt, kind)
        assert torch.equal(region, full[:, top : top + h, left : left + w]), (attempt, kind)
    assert decoded > 100 and refused > 50, (decoded, refused)  # the sweep exercised both outcomes


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_a_header_declaring_too_many_pixels_is_refused_before_decoding(progressive):
    """A few hundred bytes declaring 20000×20000 (1.2 GB of RGB; progressive: as much again for libjpeg's
    coefficients) or 65500×65500: every decoding path reads the declared size first and refuses the image,
    and nothing near that size is allocated."""
    import resource

    from data_helpers import hostile_jpeg
    from numba import njit

    from data_pipeline.jpeg_region import decode_region_into

    crop = v2.RandomResizedCrop(32, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    region_into = njit(decode_region_into)
    scratch = np.empty(64 * 64 * 3, dtype=np.uint8)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for side in (20000, 65500):
        raw = hostile_jpeg(side, side, progressive=progressive)
        jpeg = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        assert len(raw) < 4096 and declared_size(raw) == declared_size(jpeg) == image_size(jpeg) == (side, side)
        for decode in (
            lambda jpeg=jpeg: decode_rgb(jpeg),
            lambda jpeg=jpeg: DecodeResizedCrop(crop)(jpeg),
            lambda jpeg=jpeg: decode_region(jpeg, 0, 0, 16, 16),
        ):
            with pytest.raises(OversizedImage, match=f"declares {side}x{side} pixels"):
                decode()
        assert region_into(jpeg.numpy(), scratch, 0, 0, 16, 16, MAX_IMAGE_PIXELS) == -5  # FFCV's path
        # Bytes that are no marker before the frame header: libjpeg skips them with a warning (so the region
        # decoder hands the file to the full decoder), and so does the header walk.
        junk = torch.frombuffer(bytearray(raw[:2] + b"junk" + raw[2:]), dtype=torch.uint8)
        assert image_size(junk) is None and declared_size(junk) == (side, side)
        with pytest.raises(OversizedImage):
            DecodeResizedCrop(crop)(junk)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # KiB: nothing decoded
    # The bound is the caller's (data.max_image_pixels): an ordinary image over a lower bound is refused too.
    small = encode(photo(40, 50, noise=False))
    with pytest.raises(OversizedImage, match="declares 50x40 pixels"):
        DecodeResizedCrop(crop, max_pixels=40 * 50 - 1)(small)
    assert DecodeResizedCrop(crop, max_pixels=40 * 50)(small).shape == (3, 32, 32)
