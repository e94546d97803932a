"""Resuming a checkpoint on another number of ranks: what each new rank reads, the global batch rule, fresh RNG
streams for ranks the checkpoint did not have, and ZeRO-1/2 optimizer partitions cut again.

What carries over (docs/training.md, "Resuming on another world size"):

- weights: ZeRO-0–2 keep the full module in ``mp_rank_00_model_states.pt``, which any number of ranks can read;
  ZeRO-0 keeps the whole optimizer state there too;
- ZeRO-1/2 optimizer state: each old rank's partition of every flat parameter group is joined into the whole
  group, and each new rank takes its own slice of it (:func:`reshard_zero_optimizer`; the same layout DeepSpeed's
  ``elastic_checkpoint`` relies on: one flat group in parameter order, padded at its end only);
- the data position: :meth:`data_pipeline.ResumableLoader.resharded_state` (the same prefix of the epoch's order);
- per-rank state (loader, RNG, a piece's rank state): new rank ``r`` reads old rank ``r mod old_world``; the RNG
  of old rank ``r`` continues on new rank ``r``, and new ranks the checkpoint did not have start streams seeded
  from (seed, rank, step) (:func:`fresh_rng_state`).

ZeRO-3 (parameters partitioned) and the bf16 optimizer are refused on another world size.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

ZERO_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
TRAINER_FILE = re.compile(r"^trainer_rank(\d+)\.pt$")


def saved_world_size(tag_dir: Path) -> int:
    """How many ranks wrote ``tag_dir``: one ``trainer_rank{r}.pt`` per rank (0 when there is none)."""
    ranks = {int(m.group(1)) for p in Path(tag_dir).iterdir() if (m := TRAINER_FILE.match(p.name))}
    world = 0
    while world in ranks:
        world += 1
    return world


def source_rank(rank: int, saved_world: int) -> int:
    """The old rank whose per-rank state new rank ``rank`` continues."""
    return rank % saved_world


def zero_optim_files(tag_dir: Path) -> list[Path]:
    """The ZeRO-1/2 optimizer partitions of ``tag_dir``, in rank order (none under ZeRO-0)."""
    found = [(int(m.group(1)), p) for p in Path(tag_dir).iterdir() if (m := ZERO_OPTIM_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def fresh_rng_state(seed: int, rank: int, step: int) -> None:
    """Seed Python, NumPy and torch for a rank that the checkpoint did not have: a stream of its own, a function of
    (seed, rank, step) only, so that a second resume of the same checkpoint draws the same."""
    base = np.random.SeedSequence([seed, rank, step, 0x5E5A]).generate_state(3)
    random.seed(int(base[0]))
    np.random.seed(int(base[1]))
    torch.manual_seed(int(base[2]))


def batch_options(global_batch: int, world: int, micro_batch: int, accumulation: int) -> str:
    """The ``--set`` values that give ``global_batch`` on ``world`` ranks, as one phrase."""
    if global_batch % world:
        divisors = [w for w in range(1, global_batch + 1) if global_batch % w == 0][:12]
        return (
            f"no data.batch_size × optimizer.gradient_accumulation_steps gives {global_batch} on {world} ranks: "
            f"resume on a number of ranks that divides {global_batch} ({', '.join(map(str, divisors))}, ...)"
        )
    per_rank = global_batch // world
    options = []
    if per_rank % micro_batch == 0:
        options.append(f"--set optimizer.gradient_accumulation_steps={per_rank // micro_batch}")
    if per_rank % accumulation == 0:
        options.append(f"--set data.batch_size={per_rank // accumulation}")
    if not options:
        pairs = [(b, per_rank // b) for b in range(per_rank, 0, -1) if per_rank % b == 0][:4]
        options = [f"--set data.batch_size={b} optimizer.gradient_accumulation_steps={a}" for b, a in pairs]
    return "keep it with " + " or ".join(options) + " (and --allow-config-change)"


def check_global_batch(
    client: dict[str, Any], tag: str, *, saved_world: int, world: int, micro_batch: int, accumulation: int
) -> str | None:
    """None when a checkpoint of ``saved_world`` ranks can resume on ``world`` ranks with this micro-batch and
    accumulation (the same global batch), else the one-line reason, with the settings that would keep it."""
    saved = client.get("global_batch")
    if saved is None:
        return (
            f"checkpoint {tag} was written by {saved_world} ranks, this run has {world}, and it predates resuming on "
            f"another world size (it does not record its global batch): resume it on {saved_world} ranks"
        )
    have = micro_batch * accumulation * world
    if have == saved:
        return None
    return (
        f"checkpoint {tag} was written by {saved_world} ranks with global batch {saved} (data.batch_size "
        f"{client.get('micro_batch')} × optimizer.gradient_accumulation_steps {client.get('accumulation')} × "
        f"{saved_world}); this run has {world} rank(s) and global batch {have} ({micro_batch} × {accumulation} × "
        f"{world}): {batch_options(saved, world, micro_batch, accumulation)}"
    )


def _partition_states(saved: dict[str, Any], group: int) -> dict[str, torch.Tensor]:
    """The optimizer state of flat group ``group`` in one old rank's ZeRO-1/2 file, without the padding."""
    length = saved["single_partition_of_fp32_groups"][group].numel()
    base = saved["base_optimizer_state"]
    state = base["state"].get(group, {}) if isinstance(base, dict) else base[group]  # rigid or elastic layout
    return {k: v.reshape(-1)[:length] for k, v in state.items() if torch.is_tensor(v) and v.numel() >= length}


def reshard_zero_optimizer(optimizer, saved: list[dict[str, Any]]) -> None:
    """Give a ZeRO-1/2 optimizer the state that ``saved`` (every old rank's ``optimizer_state_dict``, in rank
    order) held, cut for this rank's partitions.  The fp32 master weights are refreshed from the module first (our
    engines train in fp32, so that copy is exact); the momentum of every flat group is the old partitions joined
    (each without its padding) and sliced at this rank's partition."""
    optimizer.refresh_fp32_params()
    inner = optimizer.optimizer
    for group, partition in enumerate(optimizer.single_partition_of_fp32_groups):
        if any(optimizer.round_robin_bit16_padding[group]):
            raise ValueError("zero_optimization.parameter_alignment pads each parameter; resharding needs it off")
        pieces = [_partition_states(sd, group) for sd in saved]
        keys = set(pieces[0])
        if any(set(p) != keys for p in pieces):
            raise ValueError(f"optimizer group {group}: the old ranks' partitions hold different state keys")
        rank = dist.get_rank(group=optimizer.real_dp_process_group[group])
        size = partition.numel()
        for key in sorted(keys):
            whole = torch.cat([p[key] for p in pieces])
            expected = sum(p.numel() for p in optimizer.bit16_groups[group])
            if whole.numel() != expected:
                raise ValueError(f"optimizer group {group}: {whole.numel()} saved values for {expected} parameters")
            mine = torch.zeros(size, dtype=partition.dtype, device=partition.device)
            piece = whole[rank * size : (rank + 1) * size]
            mine[: piece.numel()] = piece.to(partition.dtype)
            inner.state[partition][key] = mine
    if hasattr(optimizer, "_link_all_hp_params"):
        optimizer._link_all_hp_params()
