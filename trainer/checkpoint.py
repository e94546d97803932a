"""Sharded DeepSpeed checkpoints with a commit marker, per-rank trainer state and retention.

Layout: ``<run>/checkpoints/<tag>/`` holds DeepSpeed's files (every rank writes its own shards) plus
``trainer_rank{r}.pt`` (loader position and RNG states of rank r).  ``<run>/checkpoints/latest`` names
the newest committed tag and is written by rank 0 only after every rank finished writing (barrier),
via a temporary file and an atomic rename, so a half-written checkpoint is never picked up.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fileops import atomic_write_text

LATEST = "latest"
TAG_PATTERN = re.compile(r"^step(\d{9})$")


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The committed tag named by ``latest`` (None when there is no committed checkpoint)."""
    marker = Path(checkpoint_dir) / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    return tag if (Path(checkpoint_dir) / tag).is_dir() else None


class Checkpointer:
    """Saves, prunes and loads the run's checkpoints; :meth:`should_save` is the one saving rule."""

    def __init__(self, checkpoint_dir: Path, rank: int, world_size: int, *, keep: int, every_steps: int):
        self.dir = Path(checkpoint_dir)
        self.rank, self.world_size, self.keep, self.every_steps = rank, world_size, keep, every_steps
        self.last_tag: str | None = None
        """The newest tag this run saved or resumed from."""

    def should_save(
        self, step: int, *, last: bool = False, epoch_end: bool = False, stop: bool = False, healthy: bool = True
    ) -> bool:
        """Save at ``step``?  Always at the final step, an epoch end or a stop request; every ``every_steps``
        steps only when ``healthy`` (never during a streak of skipped steps, so the newest periodic
        checkpoint stays a good one); and never twice for the same step."""
        if self.last_tag == tag_for(step):
            return False
        return last or epoch_end or stop or (healthy and step % self.every_steps == 0)

    def save(self, engine, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]) -> str:
        tag = tag_for(step)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rank_state, self.dir / tag / f"trainer_rank{self.rank}.pt")
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            atomic_write_text(self.dir / LATEST, tag)
            self._prune(keep_tag=tag)
        if dist.is_initialized():
            dist.barrier()
        self.last_tag = tag
        return tag

    def _prune(self, keep_tag: str) -> None:
        tags = sorted(p.name for p in self.dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
        for old in [t for t in tags if t != keep_tag][: max(0, len(tags) - self.keep)]:
            shutil.rmtree(self.dir / old, ignore_errors=True)

    def load(self, engine, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(client state, this rank's trainer state) of ``tag``, after loading weights and optimizer."""
        rank_file = self.dir / tag / f"trainer_rank{self.rank}.pt"
        if not rank_file.is_file():
            raise RuntimeError(f"checkpoint {self.dir / tag} has no {rank_file.name}: it was written by fewer ranks")
        path, client_state = engine.load_checkpoint(str(self.dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
        state = torch.load(rank_file, weights_only=False)
        self.last_tag = tag
        return client_state, state
