"""``engine.activation_checkpointing``: a checkpointed forward + backward equals the plain one (outputs, gradients,
drop-path masks) and updates BatchNorm running statistics once; local sharing's routing and overrides, and a
set_arch between forward and backward, recompute what the forward ran; a short run trains the same numbers."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from trainer_helpers import overrides, run_in_process

from models import ArchSampler, ModelConfig, WidthArch, build_supernet, ops
from models.config import LocalSharingConfig
from typedconfig import ConfigError


def supernet(checkpointing: bool, **model) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_supernet(ModelConfig(num_classes=10, **model)).train()
    net.activation_checkpointing = checkpointing
    return net


def step(net: torch.nn.Module, batch: int = 4, resolution: int = 32, before_backward=None) -> torch.Tensor:
    """One forward + backward on a fixed batch, drop-path draws from a fixed seed; the logits."""
    images = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    logits = net(images)
    if before_backward is not None:
        before_backward()
    logits.logsumexp(1).mean().backward()
    return logits.detach()


def assert_same(a: torch.nn.Module, b: torch.nn.Module, logits_a: torch.Tensor, logits_b: torch.Tensor) -> None:
    assert torch.equal(logits_a, logits_b)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=name)
    for (name, x), y in zip(a.named_buffers(), b.buffers()):  # running_mean, running_var, num_batches_tracked
        assert torch.equal(x, y), name


@pytest.mark.parametrize("bn_momentum", [0.1, None])
def test_checkpointed_step_equals_the_plain_one_with_drop_path_and_bn_updated_once(bn_momentum, monkeypatch):
    model = {"search_space": "tiny", "bn_momentum": bn_momentum, "drop_connect": 0.9}
    plain, checkpointed = supernet(False, **model), supernet(True, **model)
    assert any(block.drop_path_rate > 0 for block in plain.blocks)
    for net in (plain, checkpointed):
        net.set_arch(net.space.largest(), regularize=True)
    logits = step(plain)
    assert_same(plain, checkpointed, logits, step(checkpointed))
    tracked = [v for k, v in checkpointed.state_dict().items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == 1 for v in tracked)  # the recompute did not count a second batch

    # drop-path is really on (the recompute must have drawn the same masks) ...
    unregularized = supernet(False, **model)
    assert not torch.equal(step(unregularized), logits)
    # ... and without the recompute context BatchNorm would update twice: the check above would catch it.
    monkeypatch.setattr(ops, "recomputing", nullcontext)
    twice = supernet(True, **model)
    twice.set_arch(twice.space.largest(), regularize=True)
    step(twice)
    assert any(int(v) == 2 for k, v in twice.state_dict().items() if k.endswith("num_batches_tracked"))


def test_checkpointing_is_off_without_gradients_or_in_eval(monkeypatch):
    calls = []
    original = ops.checkpointed
    monkeypatch.setattr("models.mbconv.supernet.checkpointed", lambda *a: calls.append(1) or original(*a))
    net = supernet(True, search_space="tiny")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        net(images)
    net.eval()(images)
    assert calls == []
    net.train()(images)
    assert len(calls) == len(net.plan.blocks)


def test_the_recompute_runs_the_forwards_subnet_after_set_arch():
    """The sandwich runs backward at once, but local sharing's look-ahead differentiates after resetting the
    overrides: the recompute must use the shape and weights of its forward, not the supernet's state by then."""
    model = {"search_space": "tiny", "bn_momentum": 0.1}
    plain, checkpointed = supernet(False, **model), supernet(True, **model)
    middle = ArchSampler(plain.space, 3).random()
    for net in (plain, checkpointed):
        net.set_arch(middle)
    logits = step(plain, resolution=middle.resolution)
    other = checkpointed.space.largest()
    assert_same(
        plain,
        checkpointed,
        logits,
        step(checkpointed, resolution=middle.resolution, before_backward=lambda: checkpointed.set_arch(other)),
    )


def test_local_sharing_routing_and_overrides_under_checkpointing():
    model = {"search_space": "tiny", "bn_momentum": 0.1, "sharing": LocalSharingConfig(candidates=3)}
    plain, checkpointed = supernet(False, **model), supernet(True, **model)
    blocks = len(plain.blocks)
    routing = {b: {1: 0.5, 2: 0.25} for b in range(blocks)}
    candidates = tuple(b % 3 for b in range(blocks))
    for net in (plain, checkpointed):
        with torch.no_grad():
            for i, p in enumerate(net.candidate_blocks.parameters()):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        net.set_arch(net.space.largest(), candidates=candidates, routing=routing)
    assert_same(plain, checkpointed, step(plain), step(checkpointed))
    assert any(p.grad is not None for p in checkpointed.candidate_blocks.parameters())

    # overrides (a look-ahead's stepped weights), reset before the backward as trainer.sharing.local does
    grads = []
    for net in (plain, checkpointed):
        net.zero_grad(set_to_none=True)
        net.set_arch(net.space.largest())
        scale = torch.ones((), requires_grad=True)
        net.overrides = {2: {n: scale * p.detach() for n, p in net.block_module(2).named_parameters()}}

        def reset(net=net):
            net.overrides = {}

        step(net, before_backward=reset)
        grads.append(scale.grad)
    assert grads[0] is not None and torch.allclose(grads[0], grads[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("space", ["tiny_slim_mbv1", "tiny_slim_mbv2"])
def test_slimmable_supernets_checkpoint_the_same(space):
    model = {"search_space": space, "bn_momentum": 0.1}
    plain, checkpointed = supernet(False, **model), supernet(True, **model)
    for net in (plain, checkpointed):
        net.set_arch(WidthArch(resolution=32, width=net.space.widths[len(net.space.widths) // 2]), regularize=True)
    assert_same(plain, checkpointed, step(plain), step(checkpointed))


def test_standalone_runs_refuse_it(repo):
    from trainer.config import load_config

    with pytest.raises(ConfigError) as caught:
        load_config(repo / "configs/tiny_finetune_cpu.yaml", ["engine.activation_checkpointing=true"])
    assert caught.value.key == "engine.activation_checkpointing"


def losses(run: Path) -> dict[int, dict[str, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in records if "lr" in r}


@pytest.mark.slow
def test_a_run_trains_the_same_with_checkpointing_and_may_resume_without(repo, digits_shards, tmp_path, single_rank):
    """Straight plain run vs. a run checkpointing activations for 3 steps, resumed without it (no
    --allow-config-change needed: the switch changes neither the weights nor the data order)."""
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    args = {"optimizer.max_steps": 4, "checkpoint.every_steps": 100}
    reference, _ = run_in_process(repo, overrides(plain, digits_shards, **args))
    first, _ = run_in_process(
        repo,
        overrides(mixed, digits_shards, **{**args, "optimizer.max_steps": 3, "engine.activation_checkpointing": True}),
    )
    assert first.trained.activation_checkpointing
    resumed, _ = run_in_process(repo, overrides(mixed, digits_shards, **args))
    assert resumed.resumed_from == "step000000003" and not resumed.trained.activation_checkpointing
    expected, got = losses(plain), losses(mixed)
    assert sorted(got) == [1, 2, 3, 4]
    for s in expected:
        assert got[s] == pytest.approx(expected[s], rel=0, abs=1e-5), s
    state = resumed.module.state_dict()
    for key, value in reference.module.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-5, msg=key)
    changes = [json.loads(line) for line in (mixed / "config_changes.jsonl").read_text().splitlines()]
    assert changes[-1]["changes"]["engine.activation_checkpointing"] == [True, False]
