"""Voted self-distillation from previous snapshots of the supernet (SD-DARTS, Zhu et al. 2021).

Every ``every_steps`` optimizer steps (once ``warmup_epochs`` have passed) a copy of the supernet's weights
and buffers joins a queue of at most ``snapshots`` copies.  For each trained sub-network the same
architecture runs through every snapshot (train-mode normalisation, no dropout, no gradient), the
snapshots' class probabilities are averaged (the vote), and ``weight`` · KD(vote ‖ sub-network) joins its
loss.  The snapshots are part of each rank's checkpoint state, so a resumed run sees the same votes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from torch import nn

from losses import check_kd_loss
from typedconfig import Range, check_ranges

TeacherName = Literal["inplace", "voted", "inplace_and_voted"]


@dataclass(kw_only=True, slots=True)
class VotedConfig:
    """``trainer.voted``: used when ``trainer.teacher`` is ``voted`` or ``inplace_and_voted``."""

    snapshots: Annotated[int, Range(ge=1)] = 1
    """K: snapshots that vote (1 is plain self-distillation from the previous snapshot)."""
    every_steps: Annotated[int, Range(ge=1)] = 100
    """S: optimizer steps between snapshots."""
    weight: Annotated[float, Range(ge=0)] = 1.0
    """λ of the vote's KD term (SD-DARTS: 1)."""
    warmup_epochs: Annotated[float, Range(ge=0)] = 0.0
    """W: no snapshot is taken (and no vote added) before this many epochs."""
    kd_loss: str = "kl"
    """The KD loss of the vote term (SD-DARTS uses KL): a registered name, as ``loss.kd_loss`` but not ``none``,
    with the ``loss:`` section's parameters."""

    def __post_init__(self) -> None:
        check_ranges(self, "trainer.voted")
        check_kd_loss(self.kd_loss, "trainer.voted.kd_loss")


class SnapshotVote:
    """The queue of snapshots and their vote for one sub-network."""

    def __init__(self, make_model: Callable[[], nn.Module], config: VotedConfig, *, warmup_steps: int):
        """``make_model``: a new supernet of the trained one's shape, on its device (its initial weights are
        overwritten; it is built on a forked RNG, so snapshots never change the training stream)."""
        self.config = config
        self.warmup_steps = warmup_steps
        self._make_model = make_model
        self.models: list[nn.Module] = []
        self.steps: list[int] = []

    @property
    def ready(self) -> bool:
        return bool(self.models)

    def maybe_snapshot(self, step: int, supernet: nn.Module) -> bool:
        """After optimizer step ``step``: take a snapshot when it is due; returns whether one was taken."""
        if step < self.warmup_steps or step % self.config.every_steps:
            return False
        self.models.append(self._copy(supernet.state_dict()))
        self.steps.append(step)
        if len(self.models) > self.config.snapshots:
            self.models.pop(0)
            self.steps.pop(0)
        return True

    def _copy(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            model = self._make_model()
        model.load_state_dict(weights)  # values cast to the snapshot's fp32
        return model.requires_grad_(False).train()

    @torch.no_grad()
    def vote(self, arch, images: torch.Tensor) -> torch.Tensor:
        """log of the snapshots' mean class probabilities for ``arch`` on ``images`` (already at its resolution)."""
        probabilities = None
        for model in self.models:
            model.set_arch(arch, regularize=False)
            p = model(images.float()).float().softmax(dim=1)
            probabilities = p if probabilities is None else probabilities + p
        return (probabilities / len(self.models)).clamp_min(1e-30).log()

    def state_dict(self) -> dict[str, Any]:
        """Steps and weights of every snapshot (tensors only: loadable with ``weights_only``)."""
        return {
            "steps": list(self.steps),
            "weights": [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.models],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.models, self.steps = [], []
        for step, weights in zip(state["steps"], state["weights"]):
            self.models.append(self._copy(weights))
            self.steps.append(int(step))
