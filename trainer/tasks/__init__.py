"""Tasks: what one training step does.  One piece per file (or folder) in this package, registered in
:data:`TASKS` under the name ``task.name`` gives: the sandwich rule for a supernet (``sandwich``), one network
distilled, fine-tuned or transferred (``one_network``).

The :class:`trainer.loop.Trainer` never asks which task it runs: it builds the task (which builds the
network the engine wraps), attaches it to the engine and data, and calls :meth:`Task.step` once per
optimizer step, :meth:`Task.validate` when due and :meth:`Task.finish` at the end; the task's pieces save
their own state under their own checkpoint keys through :meth:`Task.client_state` / :meth:`Task.rank_state`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from data_pipeline.device_transforms import normalize
from trainer.runtime.data import RunData
from trainer.runtime.engine import one_reduction
from trainer.state.pieces import PieceState
from typedconfig import Registry

TASKS = Registry("task", package="trainer.tasks")


@dataclass(kw_only=True, slots=True)
class TaskConfig:
    """``task``: ``{name: NAME, ...}`` with the keys of the task named (see ``docs/architecture.md``)."""

    registry: ClassVar[Registry] = TASKS
    name: str = "sandwich"
    """``sandwich``: train a supernet with the sandwich rule; ``one_network``: train one network (distil,
    fine-tune, transfer)."""

    def weights_identity(self) -> dict | None:
        """What of this section gives the trained weights their meaning beyond the model section (hashed into
        checkpoints with it); None: nothing."""
        return None


@dataclass(slots=True)
class RunContext:
    """What a task works with once the Trainer has built the engine and the data."""

    config: Any
    """The :class:`trainer.config.RunConfig`."""
    engine: Any
    module: nn.Module
    device: torch.device
    rank: int
    world: int
    data: RunData
    """The loaders and the run's length in steps."""
    run_dir: Path


class Task(PieceState):
    """Base of the task pieces."""

    Config: ClassVar[type[TaskConfig]]

    trained: nn.Module
    """The network the engine wraps (built by ``__init__``)."""

    def __init__(self, config: Any, *, rank: int, world: int, device: torch.device):
        self.config = config
        self.notes: list[str] = []
        """Printed when training starts."""

    @staticmethod
    def check_config(config: Any, space: Any, source: str) -> None:
        """Raise a ConfigError naming the key when the run config cannot run this task."""

    def attach(self, run: RunContext) -> None:
        """Build what needs the engine and the data."""
        self.run = run

    def describe(self) -> str:
        raise NotImplementedError

    def step(self, batches: list, lr: float, step: int) -> dict[str, torch.Tensor]:
        """Forward and backward passes of one optimizer step over ``batches`` (the optimizer steps after)."""
        raise NotImplementedError

    def over_mini_batches(self, batches: list, one: Callable[..., dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``one(batch, images, last_micro_batch)`` for each mini-batch of the step (on the device, ``images``
        normalised), inside one gradient reduction (ZeRO-2/3: the step's gradients are reduced once); the mean of
        the metrics it returns."""
        run, data = self.run, self.run.config.data
        sums: dict[str, torch.Tensor] = {}
        with one_reduction(run.engine, run.config.engine):
            for i, batch in enumerate(batches):
                batch = batch.to(run.device)
                images = normalize(batch.images, data.mean, data.std)
                for key, value in one(batch, images, i == len(batches) - 1).items():
                    sums[key] = sums.get(key, 0) + value / len(batches)
        return sums

    def after_step(self, step: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        """After optimizer step ``step``: (metrics, lines to print)."""
        return {}, []

    def validate(self, epoch: int) -> dict[str, dict[str, float]]:
        """``{network name: {"top1": .., "top5": .., "samples": ..}}``."""
        raise NotImplementedError

    def finish(self, is_main: bool) -> Path | None:
        """At the last step: write what the task leaves behind; returns its path."""
        return None


def build_task(config: Any, *, rank: int, world: int, device: torch.device) -> Task:
    return TASKS.get(config.task.name, key="task.name")(config, rank=rank, world=world, device=device)
