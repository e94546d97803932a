"""``data_pipeline.bicubic`` against torchvision's antialiased bicubic resize, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from data_pipeline.bicubic import bicubic_weights, centre_offset, resize_into_chw, resized_size

BICUBIC = v2.InterpolationMode.BICUBIC


def image(rng: np.random.Generator, height: int, width: int, smooth: bool) -> np.ndarray:
    """A (height, width, 3) uint8 view with strides of a larger array, as a crop of a decoded image is."""
    pixels = rng.integers(0, 256, (height + 5, width + 7, 3), dtype=np.uint8)
    if smooth:  # gradients and plateaus besides noise, so sums land on every rounding case
        pixels = np.cumsum(pixels, axis=1, dtype=np.uint64).astype(np.uint8) // 2 + 64
    return pixels[2 : 2 + height, 3 : 3 + width]


def as_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)


def test_resize_equals_torchvision_down_up_mixed_and_unchanged_sides():
    rng = np.random.default_rng(0)
    shapes = [((375, 500), (224, 224)), ((100, 90), (224, 224)), ((300, 120), (224, 224)), ((224, 400), (224, 224))]
    shapes += [((64, 64), (8, 8)), ((2000, 37), (16, 300)), ((31, 33), (31, 17))]
    for _ in range(25):
        shapes.append(tuple(tuple(int(v) for v in rng.integers(6, 420, 2)) for _ in range(2)))
    for k, ((height, width), out) in enumerate(shapes):
        pixels = image(rng, height, width, smooth=k % 2 == 1)
        flip = k % 3 == 0
        expected = v2.functional.resize(as_tensor(pixels), list(out), BICUBIC, antialias=True)
        expected = v2.functional.horizontal_flip(expected) if flip else expected
        result = np.empty((3, *out), dtype=np.uint8)
        resize_into_chw(pixels, out[0], out[1], 0, 0, result, flip)
        assert np.array_equal(result, expected.numpy()), (height, width, out, flip)


@pytest.mark.parametrize("short_side, crop", [(256, 224), (257, 224), (36, 32), (21, 16), (40, 40)])
def test_a_window_equals_torchvisions_resize_then_centre_crop(short_side, crop):
    """Eval: ``Resize(short_side)`` + ``CenterCrop(crop)``, computed only for the crop's window (odd
    margins take torchvision's round-half-to-even offset)."""
    rng = np.random.default_rng(short_side + crop)
    transform = v2.Compose([v2.Resize(short_side, BICUBIC, antialias=True), v2.CenterCrop(crop)])
    for height, width in [(375, 500), (500, 333), (257, 257), (60, 301), (crop, crop + 9)]:
        pixels = image(rng, height, width, smooth=True)
        out_h, out_w = resized_size(height, width, short_side)
        result = np.empty((3, crop, crop), dtype=np.uint8)
        resize_into_chw(pixels, out_h, out_w, centre_offset(out_h, crop), centre_offset(out_w, crop), result, False)
        assert np.array_equal(result, transform(as_tensor(pixels)).numpy()), (height, width)


def test_weights_are_keys_cubic_stretched_by_the_scale_and_normalised():
    """Independent of torchvision: the int16 weights are round(w * 2**bits) of the normalised Keys cubic
    (a = -0.5) at the input samples' distances from the output sample's centre, divided by the scale when
    downscaling; ``bits`` is the largest that keeps the largest weight under 2**15."""

    def keys(x: float) -> float:
        x = abs(x)
        if x < 1:
            return 1.5 * x**3 - 2.5 * x**2 + 1
        return -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2 if x < 2 else 0.0

    for in_size, out_size in [(500, 224), (100, 224), (30, 7)]:
        first, count, weights, bits = bicubic_weights(in_size, out_size)
        scale = in_size / out_size
        stretch = max(scale, 1.0)
        real = []
        for i in range(out_size):
            centre = (i + 0.5) * scale
            taps = [j for j in range(in_size) if abs((j + 0.5 - centre) / stretch) < 2]
            assert (first[i], count[i]) == (taps[0], len(taps))
            w = np.array([keys((j + 0.5 - centre) / stretch) for j in taps])
            real.append(w / w.sum())
        assert 2**14 <= max(w.max() for w in real) * 2**bits < 2**15
        for i, w in enumerate(real):
            np.testing.assert_allclose(weights[i, : count[i]], w * 2**bits, atol=0.5 + 1e-6)
            assert not weights[i, count[i] :].any()
