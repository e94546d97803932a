"""What every rank must agree on: stop flags (one all-reduce), problems found by some ranks, logged means."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from trainer.runtime.collectives import all_reduce_


def _several(world: int) -> bool:
    return dist.is_initialized() and world > 1


def agree(*flags: bool) -> list[bool]:
    """For each flag: true on every rank when it is true on any rank (one all-reduce)."""
    values = torch.tensor([1.0 if flag else 0.0 for flag in flags])
    return [bool(v) for v in all_reduce_(values, dist.ReduceOp.MAX).tolist()]


def gathered_objects(value: Any, world: int) -> list[Any]:
    """``value`` of every rank, in rank order (every rank must call this)."""
    if not _several(world):
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def problems_of_all_ranks(problem: str | None, world: int) -> str:
    """'rank R: problem' for every rank that found one, joined (every rank must call this)."""
    found = [f"rank {r}: {p}" for r, p in enumerate(gathered_objects(problem, world)) if p]
    return "; ".join(dict.fromkeys(found))


def averaged_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over every rank (one all-reduce, on a copy), so that every rank takes the same
    decision or logs the same number."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = all_reduce_(values.clone())
        values /= dist.get_world_size()
    return values


def mean_over_ranks(values: dict[str, Any]) -> dict[str, float]:
    """``values`` as floats, the tensors among them averaged over ranks (one all-reduce)."""
    keys = sorted(k for k, v in values.items() if isinstance(v, torch.Tensor))
    if keys:
        stacked = averaged_over_ranks(torch.stack([values[k].float().cpu() for k in keys]))
        values = {**values, **dict(zip(keys, stacked.tolist()))}
    return {k: float(v) for k, v in values.items()}
