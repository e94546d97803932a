"""``engine.channels_last`` and ``engine.precision: bf16_autocast``: what the convolutions receive, and that the numbers
stay those of the plain NCHW fp32 step (exactly up to float rounding for the layout, within bf16's precision
for autocast, with fp32 weights, gradients and losses)."""

from __future__ import annotations

import pytest
import torch

from losses import LossConfig, build_kd_loss, build_label_loss
from models import ArchSampler, ModelConfig, build_supernet, extract_subnet
from models.depthwise import runs_in_float32
from models.ops import DynamicDepthwiseConv2d, centre_crop_kernel
from trainer.samplers import sample_sandwich
from trainer.sections import EngineConfig
from trainer.tasks.sandwich import SandwichStep


class PlainEngine:
    """The engine interface over a module: backward passes accumulate, nothing is reduced."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x):
        return self.net(x)

    def set_gradient_accumulation_boundary(self, flag):
        pass

    def backward(self, loss):
        loss.backward()


def conv_inputs(net) -> list[tuple[bool, torch.dtype]]:
    """Record (channels-last?, dtype) of the input and output of every convolution the next forward runs; also
    the output dtypes of the depthwise ones, with whether :func:`runs_in_float32` said so, in
    ``conv_inputs.depthwise``, and of the others in ``conv_inputs.others``."""
    seen: list[tuple[bool, torch.dtype]] = []
    conv_inputs.depthwise, conv_inputs.others = [], []

    def hook(module, args, output):
        x = args[0]
        if isinstance(module, DynamicDepthwiseConv2d):  # the hook runs inside the forward's autocast
            kernel = centre_crop_kernel(module.weight[: x.shape[1]], args[1])
            conv_inputs.depthwise.append((output.dtype, runs_in_float32(x, kernel, module.stride)))
        else:
            conv_inputs.others.append(output.dtype)
        if x.ndim == 4 and x.shape[-1] > 1:  # a 1x1 map is both layouts at once
            seen.append((x.is_contiguous(memory_format=torch.channels_last), output.dtype))

    for name, module in net.named_modules():
        if name.endswith("conv") and not name.endswith("shortcut_conv"):
            module.register_forward_hook(hook)
    return seen


def sandwich_gradients(channels_last: bool, bf16_autocast: bool = False):
    torch.manual_seed(0)
    net = build_supernet(ModelConfig(search_space="tiny", num_classes=10, dropout=0.0, drop_connect=0.0)).train()
    net.channels_last = channels_last
    seen = conv_inputs(net)
    subnets = sample_sandwich(net.space, ArchSampler(net.space, 0), 4)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % 10
    step = SandwichStep(build_label_loss(LossConfig()), build_kd_loss(LossConfig()), bf16_autocast=bf16_autocast)
    metrics = step(PlainEngine(net), net, subnets, images, labels)
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    return metrics, grads, seen, net


def test_channels_last_feeds_every_convolution_nhwc_and_changes_only_rounding():
    nchw_metrics, nchw_grads, nchw_seen, _ = sandwich_gradients(channels_last=False)
    nhwc_metrics, nhwc_grads, nhwc_seen, _ = sandwich_gradients(channels_last=True)
    assert nchw_seen and not any(last for last, _ in nchw_seen)
    assert nhwc_seen and all(last for last, _ in nhwc_seen)
    assert nchw_grads.keys() == nhwc_grads.keys()
    for key, value in nchw_metrics.items():
        torch.testing.assert_close(nhwc_metrics[key], value, rtol=1e-4, atol=1e-5)
    for name, grad in nchw_grads.items():
        torch.testing.assert_close(nhwc_grads[name], grad, rtol=1e-3, atol=1e-4, msg=name)


def test_extracted_subnets_and_slimmable_networks_run_channels_last():
    net = build_supernet(ModelConfig(search_space="tiny", num_classes=10)).eval()
    arch = net.space.smallest()
    net.set_arch(arch)
    static = extract_subnet(net, arch).eval()
    seen = conv_inputs(static)
    x = torch.randn(2, 3, arch.resolution, arch.resolution)
    torch.testing.assert_close(static(x), net(x), rtol=1e-5, atol=1e-5)
    assert seen and all(last for last, _ in seen)
    slim = build_supernet(ModelConfig(search_space="tiny_slim_mbv2", num_classes=10)).eval()
    seen = conv_inputs(slim)
    arch = slim.space.largest()
    slim.set_arch(arch)
    slim(torch.randn(2, 3, arch.resolution, arch.resolution))
    assert seen and all(last for last, _ in seen)


def test_bf16_autocast_runs_convolutions_in_bf16_and_keeps_fp32_gradients():
    fp32_metrics, fp32_grads, _, _ = sandwich_gradients(channels_last=True)
    metrics, grads, _, net = sandwich_gradients(channels_last=True, bf16_autocast=True)
    depthwise = conv_inputs.depthwise
    # depthwise layers run in float32 and hand it on, except oneDNN's 3×3 stride-1 kernel on a CPU with bf16
    assert depthwise and all(dtype == (torch.float32 if fp32 else torch.bfloat16) for dtype, fp32 in depthwise)
    assert any(fp32 for _, fp32 in depthwise)
    assert conv_inputs.others and all(dtype == torch.bfloat16 for dtype in conv_inputs.others)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert all(v.dtype == torch.float32 for v in metrics.values())
    # bf16 keeps 8 bits of mantissa: losses within ~2 %, the whole gradient within a few % of its norm, and so
    # is every tensor that carries a visible share of it (a bias whose gradient the next BatchNorm cancels is
    # rounding noise in both, so it is compared only in the total)
    for key in ("loss/largest", "loss/smallest"):
        assert metrics[key].item() == pytest.approx(fp32_metrics[key].item(), rel=2e-2, abs=2e-3)
    total = torch.cat([g.flatten() for g in fp32_grads.values()]).norm()
    difference = torch.cat([(grads[name] - g).flatten() for name, g in fp32_grads.items()]).norm()
    assert difference < 0.05 * total
    for name, grad in fp32_grads.items():
        if grad.norm() > 0.01 * total:
            assert (grads[name] - grad).norm() < 0.15 * grad.norm(), name


def test_precision_is_one_choice_and_the_old_flags_map_to_it(repo):
    """``engine.precision``: fp32, bf16 (ZeRO-1 only) or bf16_autocast (any stage); 0.1's two booleans map to it,
    and both on is refused."""
    from trainer.config import load_config
    from trainer.config_keys import current_keys
    from typedconfig import ConfigError

    engine = EngineConfig(precision="bf16_autocast", zero_stage=2)
    assert engine.bf16_autocast and not engine.bf16
    assert EngineConfig(precision="bf16", zero_stage=1).bf16
    with pytest.raises(ValueError, match="zero_stage 1"):
        EngineConfig(precision="bf16", zero_stage=2)
    old = load_config(repo / "configs/tiny_cpu.yaml", ["trainer.bf16_autocast=true"]).engine
    assert old.precision == "bf16_autocast"
    assert current_keys({"trainer": {"bf16": False, "bf16_autocast": False}})["engine"] == {"precision": "fp32"}
    with pytest.raises(ConfigError, match="one choice"):
        current_keys({"trainer": {"bf16": True, "bf16_autocast": True}})


def test_pointwise_convolutions_run_as_a_matrix_product_with_conv2d_s_numbers(monkeypatch):
    """Channels-last 1×1 stride-1 convolutions on a CPU skip ``F.conv2d`` (its small-batch im2col kernel) for one
    matrix product: same outputs and gradients, through weight slices, in the supernet and extracted networks;
    strided, depthwise and k×k convolutions, NCHW inputs and export traces still call ``F.conv2d``."""
    import torch.nn.functional as F

    from models.mbconv.static import Conv2d
    from models.ops import DynamicConv2d

    calls: list[tuple[int, int]] = []
    conv2d = F.conv2d

    def counting_conv2d(x, weight, *args, **kwargs):
        calls.append(tuple(weight.shape[-2:]))
        return conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", counting_conv2d)
    torch.manual_seed(0)
    dynamic = DynamicConv2d(24, 40, 1, bias=True)
    x = torch.randn(3, 16, 7, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = dynamic(x, 32)  # weight[:32, :16], a strided slice
    assert not calls and y.shape == (3, 32, 7, 5) and y.is_contiguous(memory_format=torch.channels_last)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = dynamic.weight.detach()[:32, :16].clone().requires_grad_()
    b_ref = dynamic.bias.detach()[:32].clone().requires_grad_()
    y_ref = conv2d(x_ref, w_ref, b_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dynamic.weight.grad[:32, :16], w_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dynamic.bias.grad[:32], b_ref.grad, rtol=1e-5, atol=1e-5)
    assert dynamic.weight.grad[32:].abs().sum() == 0 and dynamic.weight.grad[:, 16:].abs().sum() == 0

    static = Conv2d(16, 8, 1)
    torch.testing.assert_close(static(x.detach()), conv2d(x.detach(), static.weight, static.bias), rtol=1e-5, atol=1e-5)
    assert not calls
    static(x.detach().contiguous())  # NCHW
    Conv2d(16, 8, 1, stride=2)(x.detach())
    Conv2d(16, 16, 3, padding=1, groups=16)(x.detach())
    assert calls == [(1, 1), (1, 1), (3, 3)]


def test_exported_onnx_keeps_a_conv_node_per_convolution(tmp_path):
    import onnx

    from models.export import export_onnx

    net = build_supernet(ModelConfig(search_space="tiny", num_classes=10)).eval()
    arch = net.space.largest()
    static = extract_subnet(net, arch)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in static.modules())
    graph = onnx.load(str(export_onnx(static, tmp_path))).graph
    kinds = [node.op_type for node in graph.node]
    assert kinds.count("Conv") == convs
    assert "MatMul" not in kinds
