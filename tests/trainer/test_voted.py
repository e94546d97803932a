"""Voted self-distillation from previous snapshots (issue 14 §1): the vote is the mean of the snapshots'
probabilities, the queue keeps the last K, and a run with snapshots resumes bit-identically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trainer_helpers import overrides, run_in_process

from models import ModelConfig, build_supernet
from trainer.teachers.voted import SnapshotVote, VotedConfig
from typedconfig import ConfigError


def test_the_vote_is_the_mean_of_the_snapshots_probabilities_and_the_queue_keeps_k():
    config = ModelConfig(search_space="tiny", num_classes=10)
    torch.manual_seed(0)
    live = build_supernet(config)
    voter = SnapshotVote(lambda: build_supernet(config), VotedConfig(snapshots=2, every_steps=3), warmup_steps=3)
    states = {}
    for step in range(1, 10):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(0.05 * torch.randn_like(p))
        states[step] = {k: v.clone() for k, v in live.state_dict().items()}
        taken = voter.maybe_snapshot(step, live)
        assert taken == (step % 3 == 0)
    assert voter.steps == [6, 9]

    arch = live.space.smallest()
    images = torch.randn(4, 3, arch.resolution, arch.resolution)
    probabilities = []
    for step in (6, 9):  # independently: each snapshot's softmax, then the mean
        model = build_supernet(config)
        model.load_state_dict(states[step])
        model.set_arch(arch)
        model.train()
        with torch.no_grad():
            probabilities.append(torch.softmax(model(images), dim=1))
    expected = torch.stack(probabilities).mean(0).log()
    torch.testing.assert_close(voter.vote(arch, images), expected, rtol=1e-5, atol=1e-6)

    restored = SnapshotVote(lambda: build_supernet(config), VotedConfig(snapshots=2), warmup_steps=0)
    restored.load_state_dict(voter.state_dict())
    assert restored.steps == [6, 9]
    torch.testing.assert_close(restored.vote(arch, images), expected, rtol=1e-5, atol=1e-6)


def test_zero_3_is_refused_with_a_reason(repo):
    from trainer.config import load_config

    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_config(repo / "configs" / "tiny_cpu.yaml", ["task.teacher=voted", "engine.zero_stage=3"])


def losses(run: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        r["step"]: {k: v for k, v in r.items() if k.startswith(("loss/", "vote_kd/"))} for r in records if "lr" in r
    }


@pytest.mark.parametrize("teacher", ["voted", "inplace_and_voted"])
def test_a_run_with_snapshots_resumes_bit_identically(repo, digits_shards, tmp_path, single_rank, teacher):
    extra = {"task.teacher.name": teacher, "task.teacher.snapshots": 2, "task.teacher.every_steps": 2}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    trainer, _ = run_in_process(repo, overrides(straight, digits_shards, **extra))
    assert trainer.task.teacher.voter.steps == [4, 6]
    steps = losses(straight)
    assert "vote_kd/smallest" not in steps[2] and "vote_kd/smallest" in steps[3]  # first snapshot after step 2
    after = steps[5]
    if teacher == "voted":  # the vote replaces the in-place teacher: a student's loss is the vote term alone
        assert after["loss/smallest"] == pytest.approx(after["vote_kd/smallest"], rel=1e-6)
    else:
        assert after["loss/smallest"] > after["vote_kd/smallest"]
    run_in_process(repo, overrides(resumed, digits_shards, **{**extra, "optimizer.max_steps": 3}))
    trainer, _ = run_in_process(repo, overrides(resumed, digits_shards, **extra))
    assert trainer.resumed_from == "step000000003"
    assert losses(resumed) == steps


def test_the_voted_recipe_says_both_terms(repo):
    from trainer.config import load_config

    teacher = load_config(repo / "configs" / "tiny_voted_cpu.yaml").task.teacher
    assert teacher.name == "inplace_and_voted" and teacher.snapshots == 2 and teacher.kd_loss == "kl"
