"""Slimmable MobileNetV1/V2 spaces: exact cost against published numbers, torchvision and PyTorch's FLOP counter;
the supernet's slices equal the standalone models; MobileNetV2 is torchvision's network, weight for weight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from torch.utils.flop_counter import FlopCounterMode
from trainer_helpers import overrides, run_in_process

from models import (
    ArchSampler,
    ModelConfig,
    SlimmableSpace,
    WidthArch,
    build_subnet,
    build_supernet,
    extract_subnet,
    load_search_space,
    load_subnet,
    subnet_cost,
)
from typedconfig import ConfigError


def counted_macs(model: torch.nn.Module, resolution: int) -> int:
    """Multiply-adds of one image by PyTorch's own counter (it reports 2 FLOPs per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, resolution, resolution))
    return counter.get_total_flops() // 2


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("space", "mflops", "params_m"),
    [("slimmable_mbv1", 569, (4.2, 4.24)), ("slimmable_mbv2", 300, (3.4, 3.51))],
)
def test_the_full_width_models_cost_what_the_papers_say(space, mflops, params_m):
    s = load_search_space(space)
    cost = subnet_cost(s, s.largest())
    assert s.largest() == WidthArch(resolution=224, width=1.0)
    assert round(cost.mflops) in (mflops, mflops + 1)  # MobileNetV1 569 MFLOPs, MobileNetV2 300 (Howard / Sandler)
    assert params_m[0] <= cost.params_m <= params_m[1]


@pytest.mark.parametrize("width", [0.35, 0.5, 0.75, 1.0])
def test_mobilenet_v2_counts_equal_torchvision_at_every_width(width):
    space = load_search_space("slimmable_mbv2")
    arch = WidthArch(resolution=224, width=width)
    reference = torchvision.models.mobilenet_v2(width_mult=width)
    cost = subnet_cost(space, arch)
    assert cost.params == n_params(reference)
    assert cost.macs == counted_macs(reference, 224)
    ours = build_subnet(space, arch)
    assert n_params(ours) == cost.params and counted_macs(ours, 224) == cost.macs


@pytest.mark.parametrize("width", [0.25, 0.6, 1.0])
def test_mobilenet_v1_counts_equal_the_flop_counter(width):
    space = load_search_space("slimmable_mbv1")
    arch = WidthArch(resolution=224, width=width)
    model = build_subnet(space, arch)
    cost = subnet_cost(space, arch)
    assert n_params(model) == cost.params and counted_macs(model, 224) == cost.macs


@pytest.mark.parametrize("width", [0.35, 0.75, 1.0])
def test_mobilenet_v2_is_torchvisions_network(width):
    """torchvision's weights, loaded in order into our standalone model, give the same logits."""
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v2(width_mult=width, num_classes=10).eval()
    for m in reference.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    ours = build_subnet(load_search_space("slimmable_mbv2"), WidthArch(resolution=224, width=width), 10).eval()
    theirs, mine = list(reference.state_dict().values()), ours.state_dict()
    assert [tuple(t.shape) for t in theirs] == [tuple(t.shape) for t in mine.values()]
    ours.load_state_dict(dict(zip(mine, theirs)))
    x = torch.randn(2, 3, 96, 96)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("space", ["tiny_slim_mbv1", "tiny_slim_mbv2"])
def test_every_width_of_the_supernet_equals_its_standalone_model(space):
    torch.manual_seed(0)
    net = build_supernet(ModelConfig(search_space=space, num_classes=10, bn_momentum=None))
    net.train()
    for _ in range(2):  # populate running statistics of the widest layers
        net(torch.randn(8, 3, 32, 32))
    net.eval()
    x = torch.randn(4, 3, 32, 32)
    for width in net.space.widths:
        arch = WidthArch(resolution=32, width=width)
        net.set_arch(arch)
        static = extract_subnet(net, arch).eval()
        assert n_params(static) == subnet_cost(net.space, arch, 10).params
        torch.testing.assert_close(static(x), net(x), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="built for"):
            static.set_arch(net.space.largest() if width != net.space.widths[-1] else net.space.smallest())


def test_width_grid_sampling_and_validation():
    space = load_search_space("slimmable_mbv2")
    assert space.widths[0] == 0.35 and space.widths[-1] == 1.0 and len(space.widths) == 14
    sampler = ArchSampler(space, seed=3)
    drawn = {sampler.random().width for _ in range(300)}
    assert drawn == set(space.widths)
    mutated = sampler.mutate(space.smallest(), prob=1.0)
    assert mutated.width != space.smallest().width and not mutated.problems(space)
    assert WidthArch(resolution=224, width=0.33).problems(space) == ["width 0.33 not in the grid 0.35..1.0 step 0.05"]
    with pytest.raises(ValueError, match="not a whole number of width_step"):
        SlimmableSpace.from_dict({**space.to_dict(), "width_range": [0.35, 0.97]})
    with pytest.raises(ConfigError, match="family"):
        SlimmableSpace.from_dict({**space.to_dict(), "family": "mobilenet_v3"})


# ---- the tiny slimmable recipe end to end: train, checkpoint, resume, width table, export ----------------
RECIPE = "configs/tiny_slim_cpu.yaml"


def metric_lines(run: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in records if "loss/largest" in r}


def test_tiny_slimmable_recipe_trains_resumes_and_reports_every_width(repo, digits_shards, tmp_path, single_rank):
    extra = {"optimizer.max_steps": 6, "eval.calib_batches": 2}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _, results = run_in_process(repo, overrides(straight, digits_shards, **extra), recipe=RECIPE)
    assert results["global_step"] == 6 and results["val"]["largest"]["samples"] > 0
    run_in_process(repo, overrides(resumed, digits_shards, **{**extra, "optimizer.max_steps": 4}), recipe=RECIPE)
    trainer, _ = run_in_process(repo, overrides(resumed, digits_shards, **extra), recipe=RECIPE)
    assert trainer.resumed_from == "step000000004"
    assert metric_lines(resumed) == metric_lines(straight)  # bit-identical continuation
    assert set(metric_lines(straight)[1]) == {"loss/largest", "loss/random1", "loss/random2", "loss/smallest"}

    from search import run as search

    config = tmp_path / "search.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "search": {
                    "min_mflops": 0.1,
                    "max_mflops": 1.0,
                    "population": 24,
                    "calib_batches": 2,
                    "val_batches": 2,
                    "batch_size": 50,
                    "bucket_mflops": 0.05,
                }
            }
        )
    )
    args = ["--config", str(config), "--run-dir", str(straight), "--export", "0.5x"]
    assert search.main(args) == 0
    out = straight / "search"
    widths = json.loads((out / "widths.json").read_text())
    space = load_search_space("tiny_slim_mbv2")
    assert list(widths) == [f"{w:g}x" for w in space.widths]
    assert [r["arch"]["width"] for r in widths.values()] == list(space.widths)
    mflops = [r["mflops"] for r in widths.values()]
    assert mflops == sorted(mflops) and all(0 <= r["top1"] <= 100 for r in widths.values())
    assert (out / "widths.png").stat().st_size > 10_000
    assert len((out / "candidates.jsonl").read_text().splitlines()) == len(space.widths)  # each scored once
    exported = load_subnet(out / "exports" / "0.5x")
    assert exported.arch == WidthArch(resolution=32, width=0.5)
    assert n_params(exported) == subnet_cost(space, exported.arch, 10).params
