"""bench.kd_gradients: the flattened gradient is autograd's, and the measures are what they say."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.common import REPO
from bench.kd_gradients import STUDENT_LOSSES, flat_gradient, measure
from models import build_supernet
from trainer.config import load_config


def test_flat_gradient_is_the_concatenated_backward():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    x = torch.randn(5, 4)
    params = list(net.parameters())
    ours = flat_gradient(net(x).pow(2).sum(), params)
    net(x).pow(2).sum().backward()
    torch.testing.assert_close(ours, torch.cat([p.grad.flatten() for p in params]))


def test_measure_on_a_fresh_supernet():
    config = load_config(REPO / "configs/tiny_cpu.yaml")
    torch.manual_seed(0)
    net = build_supernet(config.model)
    g = torch.Generator().manual_seed(1)
    batch = SimpleNamespace(
        images=torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8),
        labels=torch.randint(0, 10, (8,), generator=g),
    )
    values = measure(net, config, [batch], seed=0)
    for name in STUDENT_LOSSES:
        assert values[f"student {name}: gradient norm"] > 0
        assert -1 <= values[f"student {name}: cosine with the largest's"] <= 1
    assert 0 <= values["adaptive: α− share"] <= 1
    assert 0 <= values["largest: top-1 on the batches"] <= 100
