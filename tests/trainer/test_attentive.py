"""Attentive sampling (issue 14 §2): candidates near a FLOPs target, the arg-best of the proxy, the same on
every rank, and a run that resumes bit-identically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from trainer_helpers import free_port, overrides, run_in_process

from models import load_search_space
from models.flops import subnet_cost
from trainer.samplers import SamplerContext
from trainer.samplers.attentive import AttentiveConfig, AttentiveSampler, attentive_middle


def sampler(seed: int = 0, **config) -> AttentiveSampler:
    space = load_search_space("tiny")
    context = SamplerContext(space, seed, lambda arch: subnet_cost(space, arch, 10).mflops)
    return AttentiveSampler(AttentiveConfig(**config), context)


def test_candidates_share_the_bucket_of_their_target_and_are_seeded():
    space = load_search_space("tiny")
    first, again = sampler(candidates=4), sampler(candidates=4)
    lo, hi = (subnet_cost(space, a, 10).mflops for a in (space.smallest(), space.largest()))
    assert first.bucket_mflops == pytest.approx((hi - lo) / 40)
    targets, outside = set(), 0
    for _ in range(50):
        target, candidates = first.candidates()
        assert (target, candidates) == again.candidates()  # the same seed draws the same: every rank agrees
        assert len(candidates) == 4
        outside += sum(first.bucket(a) != target for a in candidates)
        targets.add(target)
    assert outside == first.misses < 20  # only candidates of rare buckets miss (10 % of 200 at most)
    assert len(targets) > 10  # targets spread over the FLOPs range


def test_the_choice_is_the_arg_best_or_arg_worst_of_the_proxy():
    losses = torch.tensor([0.7, 0.2, 0.9])
    assert sampler(choice="best_up").choose(["a", "b", "c"], losses) == (1, "b")
    assert sampler(choice="worst_up").choose(["a", "b", "c"], losses) == (2, "c")


def _rank_choice(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    attentive, space = sampler(seed=3), load_search_space("tiny")
    calls = []

    def proxy(arch):  # each rank sees another mini-batch: rank 1's losses favour other candidates
        value = subnet_cost(space, arch, 10).mflops
        calls.append(value)
        return torch.tensor(value if rank == 0 else 10.0 - 3.0 * value)

    middle = attentive_middle(attentive, 2, proxy)
    torch.save({"middle": [a.to_dict() for a in middle], "calls": calls}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_every_rank_trains_the_arg_best_of_the_mean_proxy(tmp_path):
    mp.start_processes(_rank_choice, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["middle"] == ranks[1]["middle"]
    space = load_search_space("tiny")
    # independently: the candidates the seeded sampler draws, scored by the mean of the two ranks' proxies
    replay = sampler(seed=3)
    for slot, chosen in enumerate(ranks[0]["middle"]):
        _, candidates = replay.candidates()
        mean = [(m + 10.0 - 3.0 * m) / 2 for m in (subnet_cost(space, a, 10).mflops for a in candidates)]
        assert chosen == candidates[min(range(len(mean)), key=mean.__getitem__)].to_dict(), slot


def middle_archs(run: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in records if "loss/random1" in r}


def test_attentive_run_trains_the_best_candidate_and_resumes_exactly(
    repo, digits_shards, tmp_path, single_rank, monkeypatch
):
    from trainer.tasks import sandwich

    seen: list[tuple[object, float]] = []
    trained: list[list] = []
    proxy, step = sandwich.SandwichTask._proxy_loss, sandwich.SandwichStep.__call__

    def recording_proxy(self, arch, images, labels):
        loss = proxy(self, arch, images, labels)
        seen.append((arch, float(loss)))
        return loss

    def recording_step(self, engine, supernet, subnets, *args, **kwargs):
        trained.append([s.arch for s in subnets])
        return step(self, engine, supernet, subnets, *args, **kwargs)

    monkeypatch.setattr(sandwich.SandwichTask, "_proxy_loss", recording_proxy)
    monkeypatch.setattr(sandwich.SandwichStep, "__call__", recording_step)
    extra = {"task.sampler.name": "attentive", "task.sampler.candidates": 3}
    straight = tmp_path / "straight"
    _, results = run_in_process(repo, overrides(straight, digits_shards, **extra))
    assert results["global_step"] == 6 and len(seen) == 6 * 2 * 3 and len(trained) == 6
    for i, archs in enumerate(trained):  # each middle slot trains the lowest-loss of its three candidates
        for slot in range(2):
            scored = seen[(i * 2 + slot) * 3 : (i * 2 + slot + 1) * 3]
            assert archs[1 + slot] == min(scored, key=lambda pair: pair[1])[0]

    resumed = tmp_path / "resumed"
    run_in_process(repo, overrides(resumed, digits_shards, **{**extra, "optimizer.max_steps": 4}))
    trainer, _ = run_in_process(repo, overrides(resumed, digits_shards, **extra))
    assert trainer.resumed_from == "step000000004"
    assert middle_archs(resumed) == middle_archs(straight)
