"""torchvision's antialiased bicubic resize of uint8 images, compiled by numba for FFCV's decode threads.

The FFCV pipeline cannot call torch (it runs in numba-compiled code, in threads), and FFCV's own resize is
OpenCV's ``INTER_AREA``: another interpolation than the one our configs promise and the WebDataset path
uses (``v2.RandomResizedCrop(..., interpolation=BICUBIC, antialias=True)``, as the reference trains with),
and, as Debian builds OpenCV, ~1 ms per crop.  This is the same computation as torchvision's uint8 path
on an AVX2 CPU, so that both formats give the same pixels for the same decoded crop:

* separable, horizontal pass first; a pass is skipped where the size does not change;
* per output pixel, the Keys cubic (a = -0.5) stretched by the scale when downscaling (the antialias),
  its taps normalised to sum 1, computed in double precision;
* the weights rounded to int16 at the largest precision that keeps the largest weight below 2**15, the
  sums in int32 from half an ulp, shifted back, clamped to 0..255 after each pass.

Integer sums do not depend on their order, so the result is exact, not close: the tests compare with
``torchvision.transforms.v2.functional.resize`` bit for bit.  Each pass runs over contiguous lines (the
image is transposed for the horizontal one), which LLVM vectorises.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_MAX_PRECISION = 22
_INT16_LIMIT = 1 << 15


@njit(nogil=True, cache=True)
def _keys_cubic(x):
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return 0.0


@njit(nogil=True, cache=True)
def bicubic_weights(in_size, out_size):
    """(first, count, weights, bits) of resizing ``in_size`` samples to ``out_size``: output ``i`` is
    ``sum(weights[i, k] * x[first[i] + k] for k < count[i])``, rounded, shifted right by ``bits``."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(np.ceil(support)) * 2 + 1
    first = np.zeros(out_size, np.int64)
    count = np.zeros(out_size, np.int64)
    real = np.zeros((out_size, taps), np.float64)
    largest = 0.0
    for i in range(out_size):
        centre = scale * (i + 0.5)
        lo = max(int(centre - support + 0.5), 0)
        n = min(max(min(int(centre + support + 0.5), in_size) - lo, 0), taps)
        total = 0.0
        for j in range(n):
            real[i, j] = _keys_cubic((j + lo - centre + 0.5) * inverse)
            total += real[i, j]
        for j in range(n):
            if total != 0.0:
                real[i, j] /= total
            largest = max(largest, real[i, j])
        first[i], count[i] = lo, n
    bits = 0
    while bits < _MAX_PRECISION and int(0.5 + largest * (1 << (bits + 1))) < _INT16_LIMIT:
        bits += 1
    weights = np.zeros((out_size, taps), np.int32)
    for i in range(out_size):
        for j in range(count[i]):
            v = real[i, j] * (1 << bits)
            weights[i, j] = int(v - 0.5) if v < 0 else int(v + 0.5)
    return first, count, weights, bits


@njit(nogil=True, cache=True)
def _resample_lines(source, first, count, weights, bits, start, destination):
    """``destination[i] = clamp(round(sum_k weights[start + i, k] * source[first[start + i] + k]))``, each a
    line of bytes: one pass of the resize, along the first axis of ``source``."""
    half, shift = np.int32(1 << (bits - 1)), np.int32(bits)
    low, high = np.int32(0), np.int32(255)  # int32 throughout, so that LLVM vectorises the loops
    width = destination.shape[1]
    total = np.empty(width, np.int32)
    for i in range(destination.shape[0]):
        lo, n = first[start + i], count[start + i]
        total[:] = half
        for k in range(n):
            weight = weights[start + i, k]
            line = source[lo + k]
            for q in range(width):
                total[q] += np.int32(line[q]) * weight
        out = destination[i]
        for q in range(width):
            out[q] = min(max(total[q] >> shift, low), high)


@njit(nogil=True, cache=True)
def _axis(in_size, out_size, start, length):
    """One axis: whether it is resized, its weights, and the input span ``[lo, hi)`` that outputs
    ``[start, start + length)`` read.  An axis whose size does not change is copied, as torchvision skips
    that pass: it gets no weights and reads its outputs' own span."""
    if in_size == out_size:
        none = np.zeros(0, np.int64)
        return False, none, none, np.zeros((0, 0), np.int32), 0, start, start + length
    first, count, weights, bits = bicubic_weights(in_size, out_size)
    last = start + length - 1
    return True, first, count, weights, bits, first[start], first[last] + count[last]


@njit(nogil=True, cache=True)
def resize_into_chw(source, out_height, out_width, top, left, destination, flip):
    """Resize ``source`` (H, W, 3 uint8, any strides) to ``out_height`` × ``out_width`` as torchvision's
    antialiased bicubic does, and write the window of rows ``[top, top + h)`` and columns ``[left, left + w)``
    of the result into ``destination`` (3, h, w), mirrored left-right when ``flip``.  Only the input rows
    and columns the window reads are touched."""
    in_height, in_width = source.shape[0], source.shape[1]
    height, width = destination.shape[1], destination.shape[2]
    resize_rows, row_first, row_count, row_weights, row_bits, row_lo, row_hi = _axis(in_height, out_height, top, height)
    resize_cols, col_first, col_count, col_weights, col_bits, col_lo, col_hi = _axis(in_width, out_width, left, width)
    rows = row_hi - row_lo
    # Horizontal pass, over the transposed image: line c holds column col_lo + c of the rows read.
    columns = np.empty((col_hi - col_lo, rows * 3), np.uint8)
    for r in range(rows):
        for c in range(col_hi - col_lo):
            pixel = source[row_lo + r, col_lo + c]
            columns[c, 3 * r], columns[c, 3 * r + 1], columns[c, 3 * r + 2] = pixel[0], pixel[1], pixel[2]
    resized_columns = np.empty((width, rows * 3), np.uint8)
    if resize_cols:
        _resample_lines(columns, col_first - col_lo, col_count, col_weights, col_bits, left, resized_columns)
    else:
        resized_columns[:] = columns
    # Vertical pass, over rows again.
    lines = np.empty((rows, width * 3), np.uint8)
    for x in range(width):
        for r in range(rows):
            lines[r, 3 * x] = resized_columns[x, 3 * r]
            lines[r, 3 * x + 1] = resized_columns[x, 3 * r + 1]
            lines[r, 3 * x + 2] = resized_columns[x, 3 * r + 2]
    resized = np.empty((height, width * 3), np.uint8)
    if resize_rows:
        _resample_lines(lines, row_first - row_lo, row_count, row_weights, row_bits, top, resized)
    else:
        resized[:] = lines
    for y in range(height):
        for x in range(width):
            target = width - 1 - x if flip else x
            destination[0, y, target] = resized[y, 3 * x]
            destination[1, y, target] = resized[y, 3 * x + 1]
            destination[2, y, target] = resized[y, 3 * x + 2]


@njit(nogil=True, cache=True)
def resized_size(height, width, short_side):
    """torchvision's ``Resize(short_side)`` output size: the short side to ``short_side``, the long side
    scaled and truncated."""
    if width <= height:
        return int(short_side * height / width), short_side
    return short_side, int(short_side * width / height)


@njit(nogil=True, cache=True)
def centre_offset(size, crop):
    """torchvision's ``CenterCrop`` offset: ``int(round((size - crop) / 2.0))`` (halves to even)."""
    return int(round((size - crop) / 2.0))
