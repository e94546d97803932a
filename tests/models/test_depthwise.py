"""The compiled depthwise convolution against PyTorch's, in float64 as the independent reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models import depthwise
from models.depthwise import depthwise_conv, pytorch_depthwise, runs_compiled
from models.mbconv.static import Conv2d
from models.ops import DynamicDepthwiseConv2d

CL = torch.channels_last


def _reference(x: torch.Tensor, weight: torch.Tensor, stride: int, grad: torch.Tensor):
    """Output and gradients of ``F.conv2d`` computed in float64 (NCHW)."""
    x64 = x.detach().double().contiguous().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    y = F.conv2d(x64, w64, None, stride, weight.shape[-1] // 2, 1, x.shape[1])
    gx, gw = torch.autograd.grad(y, (x64, w64), grad.double())
    return y, gx, gw


@pytest.fixture(params=["avx2", "avx512"])
def cpu_rules(request, monkeypatch) -> str:
    """Run a test under the dispatch rules of either kind of CPU, whichever this one is: without AVX-512 our
    loops do forward and backward (3×3 layers too); with it, 5×5 layers run oneDNN's forward and input gradient
    and our weight gradient (``HYBRID``), 3×3 layers oneDNN alone."""
    avx512 = request.param == "avx512"
    monkeypatch.setattr(depthwise, "HYBRID", avx512)
    return request.param


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    assert (ours.double() - ref).abs().max().item() <= 2e-6 * scale


@pytest.mark.parametrize(
    ("batch", "channels", "height", "width", "size", "stride"),
    [
        (2, 96, 20, 20, 3, 1),
        (3, 100, 19, 23, 3, 2),  # odd sizes, channels not a multiple of 8
        (1, 64, 9, 12, 5, 1),
        (2, 72, 17, 10, 5, 2),
        (2, 64, 8, 7, 7, 2),  # kernel larger than half the image: padding on every side
    ],
)
def test_forward_and_gradients_match_pytorch_in_float64(cpu_rules, batch, channels, height, width, size, stride):
    torch.manual_seed(0)
    x = torch.randn(batch, channels, height, width).contiguous(memory_format=CL).requires_grad_()
    weight = torch.randn(channels, 1, size, size, requires_grad=True)
    y = depthwise._DepthwiseConv2d.apply(x, weight, stride)
    assert y.is_contiguous(memory_format=CL)
    grad = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, weight), grad)
    ref_y, ref_gx, ref_gw = _reference(x, weight, stride, grad)
    _close(y, ref_y)
    _close(gx, ref_gx)
    _close(gw, ref_gw)


def test_results_do_not_depend_on_the_thread_count(cpu_rules):
    torch.manual_seed(1)
    x = torch.randn(3, 128, 21, 21).contiguous(memory_format=CL).requires_grad_()
    weight = torch.randn(128, 1, 5, 5, requires_grad=True)
    grad = torch.randn(3, 128, 11, 11).contiguous(memory_format=CL)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y = depthwise_conv(x, weight, 2)
            results.append((y, *torch.autograd.grad(y, (x, weight), grad)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_which_inputs_run_compiled(cpu_rules):
    x = torch.randn(2, 128, 24, 24).contiguous(memory_format=CL)
    w5, w3 = torch.randn(128, 1, 5, 5), torch.randn(128, 1, 3, 3)
    few = x[:, :32].contiguous(memory_format=CL)
    assert runs_compiled(x, w5, 1)
    if cpu_rules == "avx2":
        assert runs_compiled(x, w3, 1)  # 24×24 outputs
        assert not runs_compiled(x, w3, 2)  # 12×12 outputs: oneDNN's 3×3 kernel
        assert not runs_compiled(few, w5[:32], 1)  # few channels
    else:
        assert not runs_compiled(x, w3, 1)  # oneDNN's 3×3 kernel everywhere
        assert runs_compiled(few, w5[:32], 1)  # our 5×5 weight gradient at any channel count
    assert not runs_compiled(x.contiguous(), w5, 1)  # NCHW
    assert not runs_compiled(x.double(), w5.double(), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not runs_compiled(x, w5, 1)
    with pytorch_depthwise():
        assert not runs_compiled(x, w5, 1)
    assert runs_compiled(x, w5, 1)
    with FlopCounterMode(display=False) as counter:  # counts the convolution PyTorch runs instead
        depthwise_conv(x, w5, 1)
    assert counter.get_total_flops() == 2 * 2 * 128 * 24 * 24 * 25


def test_other_inputs_fall_back_to_pytorch():
    x = torch.randn(2, 16, 10, 10)
    weight = torch.randn(16, 1, 3, 3)
    assert torch.equal(depthwise_conv(x, weight, 2), F.conv2d(x, weight, None, 2, 1, 1, 16))


def test_dynamic_layer_grads_land_in_the_slice_and_crop_of_its_weight(monkeypatch):
    """A sub-network's layer uses the first channels and the centre 3×3 of a 5×5 weight: its gradient is
    that of the slice, zero elsewhere, as with PyTorch's convolution."""
    monkeypatch.setattr(depthwise, "HYBRID", False)  # the rules without AVX-512, where 3×3 layers run ours
    torch.manual_seed(2)
    layer = DynamicDepthwiseConv2d(160, 5, stride=1)
    x = torch.randn(2, 120, 20, 20).contiguous(memory_format=CL)
    assert runs_compiled(x, layer.weight[:120, :, 1:4, 1:4], 1)
    out = layer(x, 3)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_y, _, ref_gw = _reference(x, layer.weight[:120, :, 1:4, 1:4], 1, grad)
    _close(out, ref_y)
    expected = torch.zeros(160, 1, 5, 5, dtype=torch.float64)
    expected[:120, :, 1:4, 1:4] = ref_gw
    _close(layer.weight.grad, expected)
    assert not layer.weight.grad[120:].any() and not layer.weight.grad[:, :, 0].any()


def test_static_depthwise_layer_matches_nn_conv2d():
    torch.manual_seed(3)
    layer = Conv2d(96, 96, 5, 2, 2, groups=96, bias=False)
    x = torch.randn(2, 96, 15, 15).contiguous(memory_format=CL)
    assert runs_compiled(x, layer.weight, 2)
    _close(layer(x), _reference(x, layer.weight, 2, torch.zeros(2, 96, 8, 8))[0])
    dilated = Conv2d(96, 96, 5, 2, 4, dilation=2, groups=96, bias=False)  # not what the loops compute
    assert torch.allclose(dilated(x), F.conv2d(x, dilated.weight, None, 2, 4, 2, 96), atol=1e-6)


def test_low_precision_layers_run_in_float32(monkeypatch):
    """Under bf16 autocast a 5×5 layer leaves autocast: our loops on the float32 cast of its input, the float32
    result handed on, the input's gradient in its own dtype; a bf16 model gets bf16 back.  Only a 3×3 stride-1
    layer on a CPU with native bf16 keeps oneDNN's bf16 kernel."""
    torch.manual_seed(4)
    x = torch.randn(2, 64, 12, 12).contiguous(memory_format=CL).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(64, 1, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert depthwise.runs_in_float32(x, weight, 1)
        y = depthwise_conv(x, weight, 1)
    assert y.dtype == torch.float32
    grad = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, weight), grad)
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    ref_y, ref_gx, ref_gw = _reference(x.float(), weight, 1, grad)
    _close(y, ref_y)
    _close(gw, ref_gw)
    torch.testing.assert_close(gx.double(), ref_gx, rtol=1e-2, atol=1e-2 * ref_gx.abs().max().item())

    bf16_y = depthwise_conv(x, weight.to(torch.bfloat16), 1)  # a bf16 model, outside autocast
    assert bf16_y.dtype == torch.bfloat16
    expected = F.conv2d(x.double(), weight.bfloat16().double(), None, 1, 2, 1, 64)
    torch.testing.assert_close(bf16_y, expected.to(torch.bfloat16))  # bf16's tolerance: one rounding

    w3 = torch.randn(64, 1, 3, 3)
    for native in (True, False):
        monkeypatch.setattr(depthwise, "_native_bf16", lambda native=native: native)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert depthwise.runs_in_float32(x, w3, 1) is not native
            assert depthwise.runs_in_float32(x, w3, 2)
            assert (depthwise_conv(x, w3, 1).dtype == torch.bfloat16) is native
    assert not depthwise.runs_in_float32(x.float(), weight, 1)  # float32, no autocast
    with pytorch_depthwise(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert not depthwise.runs_in_float32(x, weight, 1)
