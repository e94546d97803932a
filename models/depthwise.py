"""Depthwise convolutions of channels-last float32 CPU tensors, forward and backward compiled by numba.

On a CPU, ``F.conv2d`` runs depthwise convolutions with oneDNN, whose weight gradient is the slow part of
the step: 1.5–6× the forward's time for the supernet's 3×3 and 5×5 layers at batch 4 on one thread, and
its input gradient of a stride-2 layer at 144×144 was 4× the forward (``bench/step_throughput.py`` puts
``convolution_backward`` among the step's top operators).  These loops do the same sums, vectorised over
the channels, which are contiguous in a channels-last tensor:

* forward: ``y[n, h, w, c] = Σ_ij x[n, h·s + i − p, w·s + j − p, c] · k[i, j, c]`` (zero padding ``p = k // 2``);
* input gradient, in gather form: each input pixel sums the output pixels its taps reached, so the rows of
  the input can be split between threads without two of them writing the same pixel;
* weight gradient: ``Σ_nhw g[n, h, w, c] · x[n, h·s + i − p, w·s + j − p, c]``, summed by a fixed number of
  row blocks into separate partials that are then added in order, so the result does not depend on how
  many threads ran them.

On a CPU with AVX-512, oneDNN's forward and input gradient are the faster ones and only its 5×5 weight
gradient is slow: there a 5×5 layer runs oneDNN's forward and input gradient and our weight gradient.
Low-precision layers (bf16 autocast, a bf16 model) are computed in float32 (:func:`runs_in_float32`).

Every sum runs in a fixed order: two runs (and a resumed run) compute the same bits (oneDNN's depthwise
forward and input gradient too, whatever the thread count: tested).  The results equal oneDNN's within
float rounding (the tests compare them).  The work is split over ``torch.get_num_threads()``
threads (the kernels release the GIL), so a process keeps the thread count it was given.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
from numba import njit
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from models.thread_flag import ThreadFlag

# Where these loops beat oneDNN's on a 2-core AVX2 CPU (forward + backward of each depthwise layer of the
# largest, the smallest and a random AlphaNet sub-network at batch 4, one thread): 5×5 layers from 64
# channels (1.7–2.7× faster; 0.46–0.64× at 16–24 channels), 3×3 layers from 96 channels on outputs of
# 18×18 and more (1.2–1.7×); oneDNN's 3×3 kernel was as fast or faster on fewer channels or smaller outputs.
MIN_CHANNELS = 64
MIN_CHANNELS_3X3 = 96
MIN_PIXELS_3X3 = 18 * 18
# On a CPU with AVX-512 (same measurement, 2-core AVX-512 CPU), oneDNN's forward and input gradient beat these
# loops on every supernet shape (1.5–14× for 5×5 layers), and so did its whole 3×3 kernel; but its 5×5 weight gradient took
# 1.3–8× as long as ours, from 16 channels up.  There a 5×5 layer runs oneDNN's forward and input gradient
# and our weight gradient (``HYBRID``), at any channel count, and 3×3 layers keep oneDNN.
HYBRID = torch.backends.cpu.get_cpu_capability().startswith("AVX512")

# The weight gradient is summed in this many row blocks whatever the thread count (see the module docstring).
GRAD_WEIGHT_BLOCKS = 8


@njit(nogil=True, cache=True)
def _forward_rows(x, kernel, stride, pad, out, first, last):
    """``out`` rows ``first..last`` of the flattened (sample, output row) index."""
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    size = kernel.shape[0]
    out_h, out_w = out.shape[1], out.shape[2]
    for row in range(first, last):
        n = row // out_h
        h = row - n * out_h
        for w in range(out_w):
            acc = out[n, h, w]
            for c in range(channels):
                acc[c] = 0.0
            for i in range(size):
                src_h = h * stride + i - pad
                if src_h < 0 or src_h >= height:
                    continue
                for j in range(size):
                    src_w = w * stride + j - pad
                    if src_w < 0 or src_w >= width:
                        continue
                    pixel = x[n, src_h, src_w]
                    tap = kernel[i, j]
                    for c in range(channels):
                        acc[c] += pixel[c] * tap[c]


@njit(nogil=True, cache=True)
def _grad_input_rows(grad, kernel, stride, pad, out, first, last):
    """Input-gradient rows ``first..last`` of the flattened (sample, input row) index: each input pixel
    gathers the output pixels whose taps covered it."""
    height, width, channels = out.shape[1], out.shape[2], out.shape[3]
    size = kernel.shape[0]
    out_h, out_w = grad.shape[1], grad.shape[2]
    for row in range(first, last):
        n = row // height
        h = row - n * height
        for w in range(width):
            acc = out[n, h, w]
            for c in range(channels):
                acc[c] = 0.0
            for i in range(size):
                reach_h = h + pad - i
                if reach_h < 0 or reach_h % stride != 0 or reach_h // stride >= out_h:
                    continue
                for j in range(size):
                    reach_w = w + pad - j
                    if reach_w < 0 or reach_w % stride != 0 or reach_w // stride >= out_w:
                        continue
                    pixel = grad[n, reach_h // stride, reach_w // stride]
                    tap = kernel[i, j]
                    for c in range(channels):
                        acc[c] += pixel[c] * tap[c]


@njit(nogil=True, cache=True)
def _grad_weight_rows(x, grad, stride, pad, out, first, last):
    """``out`` (size, size, C), zeroed: the weight gradient's sum over the output rows ``first..last`` of
    the flattened (sample, output row) index."""
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    size = out.shape[0]
    out_h, out_w = grad.shape[1], grad.shape[2]
    for row in range(first, last):
        n = row // out_h
        h = row - n * out_h
        for i in range(size):
            src_h = h * stride + i - pad
            if src_h < 0 or src_h >= height:
                continue
            for w in range(out_w):
                g = grad[n, h, w]
                for j in range(size):
                    src_w = w * stride + j - pad
                    if src_w < 0 or src_w >= width:
                        continue
                    pixel = x[n, src_h, src_w]
                    acc = out[i, j]
                    for c in range(channels):
                        acc[c] += g[c] * pixel[c]


_disabled = ThreadFlag()


@functools.cache
def _native_bf16() -> bool:
    """Whether oneDNN has native bf16 arithmetic on this CPU (AVX-512 BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextmanager
def pytorch_depthwise() -> Iterator[None]:
    """Within this block, on this thread, :func:`depthwise_conv` runs ``F.conv2d`` (oneDNN) whatever the
    input: the comparison ``bench/step_throughput.py`` prints, and a way out should these loops misbehave."""
    with _disabled.on():
        yield


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _run_blocks(work: Callable[[int, int, int], None], rows: int, blocks: int | None = None) -> None:
    """``work(block, first, last)`` for ``blocks`` even splits of ``rows`` (default: one per thread, at most
    one per row), on ``torch.get_num_threads()`` threads at most (the caller's thread is one of them)."""
    if blocks is None:
        blocks = max(1, min(torch.get_num_threads(), rows))
    bounds = [rows * b // blocks for b in range(blocks + 1)]
    threads = min(torch.get_num_threads(), blocks)
    if threads <= 1:
        for b in range(blocks):
            work(b, bounds[b], bounds[b + 1])
        return
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < threads - 1:
            _pool, _pool_size = ThreadPoolExecutor(threads - 1, thread_name_prefix="depthwise"), threads - 1
        pool = _pool
    # Blocks are dealt round-robin to ``threads`` lanes; lane 0 runs on this thread.
    lanes = [list(range(lane, blocks, threads)) for lane in range(threads)]

    def run(lane: Sequence[int]) -> None:
        for b in lane:
            work(b, bounds[b], bounds[b + 1])

    futures = [pool.submit(run, lane) for lane in lanes[1:]]
    run(lanes[0])
    for future in futures:
        future.result()


def output_size(size: int, kernel_size: int, stride: int) -> int:
    return (size + 2 * (kernel_size // 2) - kernel_size) // stride + 1


def _nhwc(x: torch.Tensor) -> np.ndarray:
    """The NHWC array under a channels-last NCHW tensor (no copy when it already is one)."""
    return x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).numpy()


def _onednn_grad_input(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """oneDNN's input gradient of ``F.conv2d(x, weight, None, stride, k // 2, 1, C)`` (what its backward
    computes, without the weight gradient)."""
    pad = weight.shape[-1] // 2
    mask = [True, False, False]
    args = ([stride] * 2, [pad] * 2, [1, 1], False, [0, 0], x.shape[1], mask)
    return torch.ops.aten.convolution_backward(grad_out, x, weight, None, *args)[0]


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
        n, channels, height, width = x.shape
        size = weight.shape[-1]
        ctx.stride, ctx.hybrid = stride, HYBRID
        if ctx.hybrid:  # oneDNN's forward (a channels-last result), our weight gradient in the backward
            ctx.save_for_backward(x, weight)
            return torch.nn.functional.conv2d(x, weight, None, stride, size // 2, 1, channels)
        kernel = weight.detach()[:, 0].permute(1, 2, 0).contiguous()  # (k, k, C): a tap's channels contiguous
        out = x.new_empty(n, output_size(height, size, stride), output_size(width, size, stride), channels)
        src, taps, dst = _nhwc(x.detach()), kernel.numpy(), out.numpy()
        _run_blocks(
            lambda _b, first, last: _forward_rows(src, taps, stride, size // 2, dst, first, last), n * out.shape[1]
        )
        ctx.save_for_backward(x, kernel)
        return out.permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, saved = ctx.saved_tensors  # saved: the weight (hybrid) or the (k, k, C) kernel
        stride, size = ctx.stride, saved.shape[-1] if ctx.hybrid else saved.shape[0]
        grad = _nhwc(grad_out)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0] and ctx.hybrid:
            grad_x = _onednn_grad_input(grad_out, x, saved, stride)
        elif ctx.needs_input_grad[0]:
            n, channels, height, width = x.shape
            out = x.new_empty(n, height, width, channels)
            taps, dst = saved.numpy(), out.numpy()
            _run_blocks(
                lambda _b, first, last: _grad_input_rows(grad, taps, stride, size // 2, dst, first, last), n * height
            )
            grad_x = out.permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            src = _nhwc(x.detach())
            partial = np.zeros((GRAD_WEIGHT_BLOCKS, size, size, x.shape[1]), np.float32)
            _run_blocks(
                lambda b, first, last: _grad_weight_rows(src, grad, stride, size // 2, partial[b], first, last),
                grad.shape[0] * grad.shape[1],
                GRAD_WEIGHT_BLOCKS,
            )
            total = partial[0].copy()
            for b in range(1, GRAD_WEIGHT_BLOCKS):
                total += partial[b]
            grad_w = torch.from_numpy(total).permute(2, 0, 1).unsqueeze(1)
        return grad_x, grad_w, None


def _eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A 4-d CPU input and weight, not traced for export, in no dispatch mode, outside :func:`pytorch_depthwise`."""
    return (
        x.device.type == "cpu"
        and x.ndim == 4
        and weight.device.type == "cpu"
        and not torch.jit.is_tracing()
        and not is_in_torch_dispatch_mode()
        and not _disabled
    )


def runs_compiled(x: torch.Tensor, weight: torch.Tensor, stride: int) -> bool:
    """Whether :func:`depthwise_conv` runs these loops rather than ``F.conv2d``: a float32, channels-last
    CPU input and weight of a shape where they were measured faster (``MIN_CHANNELS``...), outside autocast
    (:func:`depthwise_conv` casts to float32 first), an export trace (an ONNX graph keeps its Conv node)
    and any dispatch mode (``torch.utils.flop_counter.FlopCounterMode`` counts the convolution it sees)."""
    if not (
        _eligible(x, weight)
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.is_autocast_enabled("cpu")
    ):
        return False
    channels, size = x.shape[1], weight.shape[-1]
    if size % 2 == 0:
        return False
    if HYBRID:
        return size >= 5
    if channels < MIN_CHANNELS:
        return False
    if size >= 5:
        return True
    pixels = output_size(x.shape[2], size, stride) * output_size(x.shape[3], size, stride)
    return channels >= MIN_CHANNELS_3X3 and pixels >= MIN_PIXELS_3X3


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def runs_in_float32(x: torch.Tensor, weight: torch.Tensor, stride: int) -> bool:
    """Whether :func:`depthwise_conv` computes this bf16 / fp16 layer (a low-precision input or weight, or
    CPU autocast) in float32: these loops where :func:`runs_compiled`, oneDNN's float32 kernel otherwise.
    oneDNN's bf16 depthwise kernels took 2.2–6× the time of float32 for 5×5 and stride-2 layers even on a
    CPU with AVX-512 BF16, and without native bf16 they run one convolution per channel; only its 3×3
    stride-1 bf16 kernel on a CPU with native bf16 matched or beat float32 (1.0–2.4×), and those layers stay bf16."""
    if torch.is_autocast_enabled("cpu"):
        low = torch.get_autocast_dtype("cpu") if x.dtype != torch.float64 else x.dtype
    else:
        low = x.dtype if x.dtype in _LOW_PRECISION else weight.dtype
    if not (low in _LOW_PRECISION and _eligible(x, weight)):
        return False
    return not (low == torch.bfloat16 and weight.shape[-1] == 3 and stride == 1 and _native_bf16())


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """A depthwise convolution of ``x`` (N, C, H, W) by ``weight`` (C, 1, k, k), odd k, padding k // 2,
    no bias: these loops where :func:`runs_compiled`, ``F.conv2d`` otherwise; in float32 where
    :func:`runs_in_float32`.  Under autocast that float32 result is returned as is (the next matrix product
    casts it down; returning it cast back was slower); a bf16 / fp16 model gets its own dtype back."""
    if runs_compiled(x, weight, stride):
        return _DepthwiseConv2d.apply(x, weight, stride)
    if runs_in_float32(x, weight, stride):
        autocast = torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", enabled=False):
            out = depthwise_conv(x.float(), weight.float(), stride)
        return out if autocast else out.to(x.dtype)
    size = weight.shape[-1]
    return torch.nn.functional.conv2d(x, weight, None, stride, size // 2, 1, x.shape[1])
