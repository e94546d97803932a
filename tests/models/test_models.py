"""Supernet forward, standalone extraction equality, drop regularisation, FLOPs and params."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models import AlphaNetSupernet, ArchSampler, ModelConfig, StaticSubnet, extract_subnet, load_named_archs
from models.flops import subnet_cost
from models.mbconv.subnet_plan import plan_subnet
from models.ops import DynamicConv2d, DynamicDepthwiseConv2d, make_divisible

# The paper's Table 3, plus a5_1 as the reference code reports it (not in the paper).
PAPER_MFLOPS = {"a0": 203, "a1": 279, "a2": 317, "a3": 357, "a4": 444, "a5": 491, "a5_1": 594.79, "a6": 709}


def randomise(module: nn.Module, seed: int = 0) -> None:
    """Random weights *and* BN statistics, so equality checks cannot pass on zeros and ones."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if "num_batches_tracked" in name:
                continue
            if "running_var" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.2)


@pytest.fixture(scope="module")
def tiny_supernet(tiny_space):
    torch.manual_seed(0)
    net = AlphaNetSupernet(tiny_space, ModelConfig(search_space="tiny", num_classes=10))
    randomise(net)
    return net.eval()


def test_make_divisible_rule():
    assert make_divisible(16 * 4) == 64
    assert make_divisible(24 * 5) == 120
    assert make_divisible(12) == 16  # nearest multiple of 8, rounding half up
    assert make_divisible(10) == 16  # 8 would be more than 10% below 10
    assert make_divisible(8.5) == 8
    assert make_divisible(1152 / 4) == 288
    assert make_divisible(3) == 8  # never below the divisor


def test_supernet_runs_every_extreme_and_random_arch(tiny_space, tiny_supernet):
    sampler = ArchSampler(tiny_space, seed=1)
    for arch in [tiny_space.largest(), tiny_space.smallest()] + [sampler.random() for _ in range(5)]:
        tiny_supernet.set_arch(arch)
        out = tiny_supernet(torch.randn(2, 3, arch.resolution, arch.resolution))
        assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_set_arch_rejects_archs_outside_the_space(tiny_space, tiny_supernet):
    with pytest.raises(ValueError, match="stem width 99"):
        tiny_supernet.set_arch(tiny_space.largest().with_genes({"widths.0": 99}))


@pytest.mark.parametrize("seed", range(6))
def test_extracted_subnet_equals_supernet(tiny_space, tiny_supernet, seed):
    sampler = ArchSampler(tiny_space, seed=seed)
    arch = [tiny_space.largest(), tiny_space.smallest()][seed] if seed < 2 else sampler.random()
    tiny_supernet.set_arch(arch)
    static = extract_subnet(tiny_supernet, arch).eval()
    assert not any(type(m).__module__ in ("models.ops", "models.mbconv.supernet") for m in static.modules())
    x = torch.randn(4, 3, arch.resolution, arch.resolution, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(static(x), tiny_supernet(x), atol=1e-5, rtol=1e-5)


def test_extracted_subnet_needs_nothing_of_the_supernet(tiny_space, tiny_supernet):
    arch = ArchSampler(tiny_space, seed=9).random()
    tiny_supernet.set_arch(arch)
    static = extract_subnet(tiny_supernet, arch).eval()
    state = {k: v.clone() for k, v in static.state_dict().items()}
    # A fresh standalone module built from (space, arch) alone loads the weights and gives the same outputs.
    rebuilt = StaticSubnet(tiny_space, arch, num_classes=10).eval()
    rebuilt.load_state_dict(state)
    x = torch.randn(2, 3, arch.resolution, arch.resolution)
    with torch.no_grad():
        expected = tiny_supernet(x)
        # Changing the supernet afterwards does not touch the extracted copy.
        for p in tiny_supernet.parameters():
            p.add_(1.0)
        try:
            torch.testing.assert_close(static(x), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rebuilt(x), expected, atol=1e-5, rtol=1e-5)
        finally:
            for p in tiny_supernet.parameters():
                p.sub_(1.0)


def test_extraction_of_a_published_model_in_the_full_space(alphanet_space, repo):
    _, archs = load_named_archs(repo / "configs/alphanet_models.yaml")
    torch.manual_seed(0)
    net = AlphaNetSupernet(alphanet_space, ModelConfig())
    randomise(net, seed=1)
    net.eval().set_arch(archs["a1"])
    static = extract_subnet(net).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(static(x), net(x), atol=1e-5, rtol=1e-5)


def test_regularisation_only_when_asked_and_training(tiny_space):
    net = AlphaNetSupernet(tiny_space, ModelConfig(search_space="tiny", num_classes=10, dropout=0.5, drop_connect=0.5))
    randomise(net)
    net.train()
    arch = tiny_space.largest()
    x = torch.randn(8, 3, 32, 32)
    net.set_arch(arch, regularize=False)
    torch.testing.assert_close(net(x), net(x))  # batch-stat BN is deterministic; no dropout
    net.set_arch(arch, regularize=True)
    assert not torch.allclose(net(x), net(x))
    net.eval()
    torch.testing.assert_close(net(x), net(x))


def test_drop_path_rates_follow_the_recipe(tiny_space):
    net = AlphaNetSupernet(tiny_space, ModelConfig(search_space="tiny", drop_connect=0.2, drop_connect_stages=2))
    total = len(net.blocks)
    last_two = set(net.stage_blocks[-1] + net.stage_blocks[-2])
    for idx, block in enumerate(net.blocks):
        assert block.drop_path_rate == pytest.approx(0.2 * idx / total if idx in last_two else 0.0)


def test_zero_init_of_last_bn_gamma(tiny_space):
    net = AlphaNetSupernet(tiny_space, ModelConfig(search_space="tiny"))
    assert all(torch.count_nonzero(b.project_bn.weight) == 0 for b in net.blocks)
    net = AlphaNetSupernet(tiny_space, ModelConfig(search_space="tiny", zero_init_residual_bn=False))
    assert all(torch.count_nonzero(b.project_bn.weight) > 0 for b in net.blocks)


def measured_cost(static: StaticSubnet, resolution: int) -> tuple[int, int]:
    """Multiply-adds counted by torch's own FLOP counter (2 FLOPs per MAC) and parameters by numel."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        static.eval()(torch.zeros(1, 3, resolution, resolution))
    total = counter.get_total_flops()
    assert total % 2 == 0
    return total // 2, sum(p.numel() for p in static.parameters())


def test_analytic_cost_matches_torch_flop_counter_on_random_archs(tiny_space):
    sampler = ArchSampler(tiny_space, seed=4)
    for arch in [tiny_space.largest(), tiny_space.smallest()] + [sampler.random() for _ in range(8)]:
        cost = subnet_cost(tiny_space, arch, num_classes=10)
        assert measured_cost(StaticSubnet(tiny_space, arch, num_classes=10), arch.resolution) == (
            cost.macs,
            cost.params,
        )


@pytest.mark.parametrize("name", sorted(PAPER_MFLOPS))
def test_published_models_match_paper_and_flop_counter(repo, name):
    space, archs = load_named_archs(repo / "configs/alphanet_models.yaml")
    arch = archs[name]
    cost = subnet_cost(space, arch)
    assert abs(cost.mflops - PAPER_MFLOPS[name]) <= 1.0
    assert measured_cost(StaticSubnet(space, arch), arch.resolution) == (cost.macs, cost.params)


def test_flops_cli_json_and_table(repo):
    out = subprocess.run(
        [sys.executable, "-m", "models.flops", "configs/alphanet_models.yaml", "--json"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert set(rows) == set(PAPER_MFLOPS) | {"max", "min"}
    for name, mflops in PAPER_MFLOPS.items():
        assert abs(rows[name]["mflops"] - mflops) <= 1.0
        assert set(rows[name]) == {"name", "resolution", "mflops", "params_m"}
    assert rows["max"]["mflops"] > rows["a6"]["mflops"] and rows["min"]["mflops"] <= rows["a0"]["mflops"]
    table = subprocess.run(
        [sys.executable, "-m", "models.flops", "configs/alphanet_models.yaml"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "a6" in table.stdout and "709.0" in table.stdout
    bad = subprocess.run([sys.executable, "-m", "models.flops", "nope.yaml"], cwd=repo, capture_output=True, text=True)
    assert bad.returncode == 2 and "file not found" in bad.stderr


def test_subnet_plan_follows_the_space_rules(repo, alphanet_space):
    _, archs = load_named_archs(repo / "configs/alphanet_models.yaml")
    arch = archs["a3"]  # depths 2,3,3,4,3,5,1: stage mb1 has two blocks, so its second one is an identity
    plan = plan_subnet(alphanet_space, arch)
    assert len(plan.blocks) == sum(arch.depths) == 21
    # Supernet blocks are numbered stage after stage, max(depths) each; a stage of depth d runs its first d.
    starts = [0]
    for stage in alphanet_space.stages[:-1]:
        starts.append(starts[-1] + max(stage.depths))
    assert [b.supernet_index for b in plan.blocks] == [
        starts[s] + i for s, depth in enumerate(arch.depths) for i in range(depth)
    ]
    # Only a stage's first block strides; the side after the last block is resolution / total stride.
    assert [b.stride for b in plan.blocks if b.index_in_stage > 0] == [1] * (21 - 7)
    assert plan.spatial_sizes()[1][-1] == arch.resolution // alphanet_space.total_stride == 7
    # Widths: stem 16 → mb1 16 (identity even for the first block), mb2 24 (pool + conv), ...
    first = [b for b in plan.blocks if b.index_in_stage == 0]
    assert [(b.in_channels, b.out_channels, b.identity) for b in first[:3]] == [
        (16, 16, True),
        (16, 24, False),
        (24, 32, False),
    ]
    assert sum(b.identity for b in plan.blocks) == 21 - 6  # every block but the first of mb2..mb7
    assert (plan.head.in_channels, plan.head.expanded, plan.head.width) == (224, 6 * 224, 1984)
    assert plan.blocks[0].mid_channels == 16 and plan.blocks[2].mid_channels == make_divisible(16 * 4, 8)


def test_reference_init_is_pytorchs_layer_default(tiny_space):
    torch.manual_seed(0)
    net = AlphaNetSupernet(tiny_space, ModelConfig(search_space="tiny", num_classes=10))
    convs = [m for m in net.modules() if isinstance(m, DynamicConv2d | DynamicDepthwiseConv2d)]
    assert len(convs) > 10
    for conv in convs:
        fan_in = conv.weight[0].numel()
        bound = 1.0 / fan_in**0.5  # Kaiming-uniform with a = √5: gain √(2/6), bound gain·√(3/fan_in)
        assert conv.weight.abs().max() <= bound + 1e-7
        assert conv.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.25)
    linear_bound = 1.0 / net.classifier.weight.shape[1] ** 0.5
    assert net.classifier.bias.abs().max() <= linear_bound and net.classifier.bias.abs().max() > 0
    kaiming = AlphaNetSupernet(tiny_space, ModelConfig(search_space="tiny", num_classes=10, init="kaiming_fan_out"))
    assert torch.all(kaiming.classifier.bias == 0)
    assert kaiming.classifier.weight.std().item() == pytest.approx(0.01, rel=0.2)
    for model in (net, kaiming):  # zero-γ of each block's last BN in both schemes
        assert all(torch.all(block.project_bn.weight == 0) for block in model.blocks)
