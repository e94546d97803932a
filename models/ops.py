"""Dynamic operators: each holds the weights of its largest configuration and runs a slice of them.

Channel slices are leading slices (``weight[:out, :in]``); a smaller kernel is the centre crop of the
largest one.  The input channel count is always read from the input tensor, so a sub-network is
defined by the output widths, kernel sizes and expansion ratios set on its blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.depthwise import depthwise_conv
from models.thread_flag import ThreadFlag

_recompute = ThreadFlag()


@contextmanager
def recomputing() -> Iterator[None]:
    """The backward pass's recompute of a checkpointed segment (see :func:`checkpointed`): meanwhile
    :class:`DynamicBatchNorm2d` normalises with batch statistics as in the forward but leaves its running
    statistics alone, since the forward already updated them."""
    with _recompute.on():
        yield


def checkpointed(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``fn(*args)`` with activation checkpointing: its activations are recomputed in the backward pass
    instead of stored.  The RNG state is restored for the recompute (the same drop-path masks), and
    BatchNorm running statistics are updated once, in the forward."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), recomputing()))


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without going 10% below it (MobileNet rule)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def expanded_channels(in_channels: int, expand: int) -> int:
    """Hidden width of an inverted-residual block: the input itself at expand 1, else rounded to 8."""
    return in_channels if expand == 1 else make_divisible(round(in_channels * expand), 8)


def se_channels(channels: int, reduction: int = 4) -> int:
    """Bottleneck width of a squeeze-and-excitation module over ``channels``."""
    return make_divisible(channels // reduction, 8)


def conv_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in the memory layout the network's convolutions run in: channels-last (NHWC in memory) made
    the largest AlphaNet sub-network's forward + backward 1.5–1.8× faster on a CPU than NCHW (oneDNN's
    depthwise and 1×1 kernels; ``bench/step_throughput.py``); the logical shape stays NCHW either way.
    Without it, NCHW (contiguous), whatever layout the batch came in."""
    if x.ndim != 4:
        return x
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def pointwise_as_matmul(x: torch.Tensor, stride: int, kernel_size: int) -> bool:
    """Whether a dense convolution of ``x`` is better run by :func:`pointwise_conv`: a 1×1, stride-1
    convolution of a channels-last CPU tensor, outside an export trace (an ONNX graph keeps its Conv nodes)."""
    return (
        kernel_size == 1
        and not torch.jit.is_tracing()
        and stride == 1
        and x.device.type == "cpu"
        and x.ndim == 4
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1×1, stride-1 convolution of a channels-last tensor as one matrix product over its pixels, with the
    output channels-last too.  On a CPU at small batches PyTorch runs 1×1 convolutions with its generic
    im2col kernel (``_slow_conv2d``); the product is the same sum (within float rounding) and made the largest
    AlphaNet sub-network's forward + backward ~9 % faster at batch 4 (``weight`` may be a slice: no copy)."""
    pixels = x.permute(0, 2, 3, 1)  # (N, H, W, C), contiguous for a channels-last x
    return F.linear(pixels, weight.flatten(1), bias).permute(0, 3, 1, 2)


def centre_crop_kernel(weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    full = weight.shape[-1]
    if kernel_size == full:
        return weight
    start = (full - kernel_size) // 2
    return weight[..., start : start + kernel_size, start : start + kernel_size]


def _slice_to_shape(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Leading slices of every dimension; the two kernel dimensions of a conv weight are centre-cropped."""
    if tensor.shape == shape:
        return tensor
    index = []
    for dim, (have, want) in enumerate(zip(tensor.shape, shape)):
        start = (have - want) // 2 if tensor.ndim == 4 and dim >= 2 else 0
        index.append(slice(start, start + want))
    return tensor[tuple(index)]


def copy_sliced_weights(source: dict[str, torch.Tensor], target: nn.Module, rename=lambda key: key) -> None:
    """Load into ``target`` the slice of every ``source[rename(key)]`` that has the target tensor's shape."""
    weights = {key: _slice_to_shape(source[rename(key)], t.shape).clone() for key, t in target.state_dict().items()}
    target.load_state_dict(weights)


class DynamicConv2d(nn.Module):
    """A dense convolution (groups=1) run on ``weight[:out, :in]`` with a centre-cropped kernel."""

    def __init__(self, max_in: int, max_out: int, kernel_size: int = 1, stride: int = 1, bias: bool = False):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(max_out, max_in, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(max_out)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def forward(self, x: torch.Tensor, out_channels: int, kernel_size: int | None = None) -> torch.Tensor:
        k = kernel_size or self.weight.shape[-1]
        weight = centre_crop_kernel(self.weight[:out_channels, : x.shape[1]], k)
        bias = self.bias[:out_channels] if self.bias is not None else None
        if pointwise_as_matmul(x, self.stride, k):
            return pointwise_conv(x, weight, bias)
        return F.conv2d(x, weight, bias, self.stride, k // 2)


class DynamicDepthwiseConv2d(nn.Module):
    """A depthwise convolution over as many channels as the input has, kernel centre-cropped."""

    def __init__(self, max_channels: int, max_kernel: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(max_channels, 1, max_kernel, max_kernel))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def forward(self, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
        return depthwise_conv(x, centre_crop_kernel(self.weight[: x.shape[1]], kernel_size), self.stride)


class DynamicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first C channels of its parameters and running statistics.

    Mirrors ``nn.BatchNorm2d.forward`` (momentum, cumulative average when momentum is None, eval
    with running statistics); the running-statistic slices are views, so updates land in place.
    While :func:`recomputing`, a training-mode layer normalises with batch statistics as always but its
    update lands on copies of the running statistics (the forward already made it; the recompute must save
    the same tensors for the backward as the forward did, so they are not simply left out).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        recompute = self.training and bool(_recompute)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None and not recompute:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_stats = not self.training or self.track_running_stats
        running = [
            s[:channels] if keep_stats and s is not None else None for s in (self.running_mean, self.running_var)
        ]
        if recompute:
            running = [None if s is None else s.clone() for s in running]
        return F.batch_norm(
            x,
            *running,
            self.weight[:channels] if self.weight is not None else None,
            self.bias[:channels] if self.bias is not None else None,
            use_batch_stats,
            factor,
            self.eps,
        )


class DynamicLinear(nn.Module):
    """A linear layer over the first ``in_features`` columns of its weight."""

    def __init__(self, max_in: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, max_in))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[:, : x.shape[1]], self.bias)


class DynamicSqueezeExcite(nn.Module):
    """Squeeze-and-excitation (reduction 4, ReLU inside, hard-sigmoid gate) over the input's channels."""

    def __init__(self, max_channels: int, reduction: int = 4):
        super().__init__()
        self.reduction = reduction
        mid = se_channels(max_channels, reduction)
        self.reduce = DynamicConv2d(max_channels, mid, 1, bias=True)
        self.expand = DynamicConv2d(mid, max_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        scale = x.mean(dim=(2, 3), keepdim=True)
        scale = F.relu(self.reduce(scale, se_channels(channels, self.reduction)))
        scale = F.hardsigmoid(self.expand(scale, channels))
        return x * scale


def drop_path(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Stochastic depth ("drop path"; AlphaNet's recipe calls it drop-connect): zero each sample's residual
    branch with probability ``rate`` and rescale the kept ones by 1/(1 − rate)."""
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep
