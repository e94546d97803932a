"""Resuming on another world size, the parts that need no process group: the data position translated so that the
interrupted epoch's samples are neither lost nor repeated, the per-rank state each new rank continues, fresh RNG
streams, and the global-batch rule with its one-line refusal."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline import Batch, ResumableLoader
from data_pipeline.plan import EpochPlan
from trainer.state.checkpoint import CheckpointError, Resumed, check_resumable, rank_files
from trainer.state.reshard import batch_options, fresh_rng_state, saved_world_size, source_rank, zero_optim_files

SAMPLES = 1497  # the bundled digits' training split: not a multiple of any global batch below


class IndexBackend:
    """A backend whose batches carry only the sample indices the plan gave them."""

    def __init__(self, num_samples: int):
        self.num_samples = num_samples

    def problem_lines(self) -> list[str]:
        return []

    def iterate(self, batches, epoch):
        for batch in batches:
            indices = torch.tensor([i for i, _, _ in batch])
            yield Batch(torch.zeros(len(batch), 1, 1, 1), indices, torch.ones(len(batch), dtype=bool), indices)

    def close(self) -> None:
        pass


def loaders(world: int, batch: int, seed: int = 3) -> list[ResumableLoader]:
    plans = [EpochPlan(SAMPLES, batch, rank, world, seed, True) for rank in range(world)]
    return [ResumableLoader(IndexBackend(SAMPLES), plan, "train") for plan in plans]


def steps(ranks: list[ResumableLoader], accumulation: int, limit: int | None = None) -> list[list[int]]:
    """The samples of each optimizer step (all ranks, all mini-batches), until the epoch ends or ``limit`` steps."""
    out = []
    for groups in zip(*(loader.groups(accumulation) for loader in ranks)):
        out.append(sorted(int(i) for batches, _ in groups for b in batches for i in b.indices))
        if groups[0][1] or len(out) == limit:
            break
    return out


# (world, micro-batch, accumulation) before → after; every pair keeps the global batch
SHAPES = [
    ((2, 16, 1), (1, 16, 2)),
    ((2, 16, 1), (1, 32, 1)),
    ((1, 16, 2), (2, 16, 1)),
    ((1, 32, 1), (2, 8, 2)),
    ((2, 24, 1), (3, 16, 1)),
    ((4, 8, 1), (2, 8, 2)),
]


@pytest.mark.parametrize(("before", "after"), SHAPES, ids=[f"{b[0]}to{a[0]}-{b}-{a}" for b, a in SHAPES])
@pytest.mark.parametrize("stop", [1, 7, 30])
def test_the_interrupted_epoch_keeps_its_samples_on_another_world_size(before, after, stop):
    (world, micro, accumulation), (new_world, new_micro, new_accumulation) = before, after
    uninterrupted = steps(loaders(world, micro), accumulation)

    old = loaders(world, micro)
    consumed = steps(old, accumulation, limit=stop)
    states = [loader.state_dict() for loader in old]
    assert states[0]["epoch"] == 0 and states[0]["position"] == stop * accumulation  # mid-epoch

    new = loaders(new_world, new_micro)
    for rank, loader in enumerate(new):
        loader.load_state_dict(loader.resharded_state(states[source_rank(rank, world)]))
    rest = steps(new, new_accumulation)

    flat = Counter(i for step in consumed + rest for i in step)
    assert flat == Counter(i for step in uninterrupted for i in step)  # the same multiset: none lost or repeated
    assert max(flat.values()) == 1
    assert consumed + rest == uninterrupted  # and step by step, the same global batches
    # The next epoch is the new world's own, as if it had run from the start.
    assert steps(new, new_accumulation) == steps(_at_epoch(loaders(new_world, new_micro), 1), new_accumulation)


def _at_epoch(ranks: list[ResumableLoader], epoch: int) -> list[ResumableLoader]:
    for loader in ranks:
        loader.set_epoch(epoch)
    return ranks


def test_a_position_that_is_not_whole_batches_is_refused():
    old = loaders(2, 16)
    steps(old, 1, limit=1)  # 32 samples consumed
    new = loaders(1, 24)[0]
    with pytest.raises(ValueError, match="32 samples of epoch 0"):
        new.resharded_state(old[0].state_dict())
    with pytest.raises(ValueError, match="num_samples"):
        ResumableLoader(IndexBackend(100), EpochPlan(100, 16, 0, 1, 3, True), "train").resharded_state(
            old[0].state_dict()
        )


def test_each_new_rank_continues_an_old_ranks_state(tmp_path):
    tag = tmp_path / "step000000004"
    tag.mkdir()
    for name in ["mp_rank_00_model_states.pt", "trainer_rank0.pt", "trainer_rank1.pt"]:
        (tag / name).write_bytes(b"")
    for rank in (0, 1, 10, 2):  # rank order is numeric, not by name
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert saved_world_size(tag) == 2
    assert [p.name.split("_")[3] for p in zero_optim_files(tag)] == ["0", "1", "2", "10"]
    assert [source_rank(r, 2) for r in range(4)] == [0, 1, 0, 1]
    assert rank_files(tag, 3, saved_world=2)[-1].name == "trainer_rank1.pt"
    assert len(rank_files(tag, 3, saved_world=2)) == 1 + 4 + 1  # shared states, every partition, one trainer file
    assert [p.name for p in rank_files(tag, 1)][-2:] == [
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "trainer_rank1.pt",
    ]


def test_a_new_rank_gets_streams_of_its_own_and_the_same_ones_again():
    def draws(rank: int, step: int) -> tuple:
        fresh_rng_state(seed=0, rank=rank, step=step)
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    assert draws(1, 8) == draws(1, 8)
    assert len({draws(r, 8) for r in range(4)}) == 4 and draws(1, 8) != draws(1, 9)
    for a, b in zip(draws(1, 8), draws(2, 8)):
        assert a != b


def resumed(**client) -> Resumed:
    base = {"model_hash": "h", "world_size": 2, "global_batch": 32, "micro_batch": 16, "accumulation": 1}
    return Resumed("step000000080", {**base, **client}, {}, saved_world=2)


def test_another_world_size_must_keep_the_global_batch():
    where = Path("run/checkpoints/step000000080")
    check_resumable(resumed(), where, model_hash="h", world=1, micro_batch=16, accumulation=2)
    check_resumable(resumed(), where, model_hash="h", world=4, micro_batch=8, accumulation=1)
    with pytest.raises(CheckpointError) as err:
        check_resumable(resumed(), where, model_hash="h", world=1, micro_batch=16, accumulation=1)
    message = str(err.value)
    assert "\n" not in message and "written by 2 ranks with global batch 32" in message
    assert "--set optimizer.gradient_accumulation_steps=2" in message and "--set data.batch_size=32" in message
    with pytest.raises(CheckpointError, match="predates"):
        check_resumable(resumed(global_batch=None), where, model_hash="h", world=1, micro_batch=16, accumulation=2)
    with pytest.raises(CheckpointError, match="different model config"):
        check_resumable(resumed(), where, model_hash="other", world=2, micro_batch=16, accumulation=1)


def test_the_options_name_what_keeps_the_global_batch():
    assert batch_options(64, 3, 32, 1).startswith("no data.batch_size × optimizer.gradient_accumulation_steps")
    assert "1, 2, 4, 8, 16, 32, 64" in batch_options(64, 3, 32, 1)
    assert batch_options(64, 4, 32, 1) == "keep it with --set data.batch_size=16 (and --allow-config-change)"
    assert batch_options(96, 2, 32, 2) == "keep it with --set data.batch_size=24 (and --allow-config-change)"
    assert batch_options(96, 2, 32, 5) == (
        "keep it with --set data.batch_size=48 optimizer.gradient_accumulation_steps=1 or "
        "--set data.batch_size=24 optimizer.gradient_accumulation_steps=2 or "
        "--set data.batch_size=16 optimizer.gradient_accumulation_steps=3 or "
        "--set data.batch_size=12 optimizer.gradient_accumulation_steps=4 (and --allow-config-change)"
    )
