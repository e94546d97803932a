"""Voted self-distillation from previous snapshots of the supernet (SD-DARTS, Zhu et al. 2021).

Every ``every_steps`` optimizer steps (once ``warmup_epochs`` have passed) a copy of the supernet's weights
and buffers joins a queue of at most ``snapshots`` copies.  For each trained sub-network the same
architecture runs through every snapshot (train-mode normalisation, no dropout, no gradient), the
snapshots' class probabilities are averaged (the vote), and ``weight`` · KD(vote ‖ sub-network) joins its
loss.  The snapshots are part of each rank's checkpoint state, so a resumed run sees the same votes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Annotated, Any

import torch
from torch import nn

from losses import build_kd_loss, check_kd_loss
from trainer.teachers import TEACHERS, TeacherConfig, TeacherContext
from trainer.teachers.inplace import InplaceTeacher
from typedconfig import ConfigError, Range, check_ranges


@dataclass(kw_only=True, slots=True)
class VotedConfig(TeacherConfig):
    """``task.teacher: {name: voted, ...}``: once a snapshot exists, the vote replaces the in-place teacher."""

    name: str = "voted"
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
        check_ranges(self, "task.teacher")
        check_kd_loss(self.kd_loss, "task.teacher.kd_loss")


@dataclass(kw_only=True, slots=True)
class InplaceAndVotedConfig(VotedConfig):
    """``task.teacher: {name: inplace_and_voted, ...}``: the in-place term and the vote's, both."""

    name: str = "inplace_and_voted"


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


@TEACHERS.register("voted")
class VotedTeacher(InplaceTeacher):
    """The in-place teacher until the first snapshot; then every sub-network also learns ``weight`` · KD from the
    vote, and (``voted``) the distilled ones drop the in-place term or (``inplace_and_voted``) keep it."""

    Config = VotedConfig

    @property
    def clean_targets(self) -> bool:
        return False  # the in-place logits as AlphaNet takes them (VotedConfig has no clean_logits)

    def __init__(self, config: VotedConfig, context: TeacherContext):
        super().__init__(config, context)
        self.inplace = config.name == "inplace_and_voted"
        self.voter = SnapshotVote(
            context.make_supernet, config, warmup_steps=round(config.warmup_epochs * context.steps_per_epoch)
        )
        self.vote_loss = build_kd_loss(replace(context.loss, kd_loss=config.kd_loss))
        self.voting = False
        mib = sum(t.numel() * 4 for t in context.module.state_dict().values()) / 2**20
        self.notes.append(
            f"voted teacher: up to {config.snapshots} fp32 snapshot(s) of {mib:.1f} MiB each per rank, "
            f"one every {config.every_steps} steps from step {self.voter.warmup_steps}"
        )

    @staticmethod
    def check_config(config, space, source: str) -> None:
        if config.engine.zero_stage == 3:
            raise ConfigError(
                f"the {config.task.teacher.name} teacher keeps whole snapshots of the supernet on every rank, which "
                "ZeRO-3 partitions; use engine.zero_stage 0-2",
                key="task.teacher",
                source=source,
            )

    def describe(self) -> str:
        c = self.config
        return f"{c.name} teacher: {c.snapshots} snapshot(s) every {c.every_steps} steps"

    def begin(self, step: int = 0) -> None:
        super().begin(step)
        self.voting = self.voter.ready

    def student_loss(self, name, logits, teacher, labels, metrics) -> torch.Tensor:
        if self.kd_loss is not None and self.voting and not self.inplace:
            return logits.new_zeros((), dtype=torch.float32)
        return super().student_loss(name, logits, teacher, labels, metrics)

    def extra_loss(self, name: str, arch, logits: torch.Tensor, inputs: torch.Tensor, metrics: dict):
        if not self.voting:
            return None
        vote = self.vote_loss(logits, self.voter.vote(arch, inputs))
        metrics[f"vote_kd/{name}"] = vote.detach().float()
        return self.config.weight * vote

    def after_step(self, step: int, module: nn.Module) -> dict[str, torch.Tensor]:
        if self.voter.maybe_snapshot(step, module):
            return {"voted/snapshots": torch.tensor(float(len(self.voter.models)))}
        return {}

    def rank_state(self) -> dict[str, Any]:
        return {"voted": self.voter.state_dict()}

    def load_state(self, client: dict[str, Any], rank: dict[str, Any]) -> None:
        self.voter.load_state_dict(rank.get("voted", {"steps": [], "weights": []}))


@TEACHERS.register("inplace_and_voted")
class InplaceAndVotedTeacher(VotedTeacher):
    Config = InplaceAndVotedConfig
