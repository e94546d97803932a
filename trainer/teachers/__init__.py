"""Teachers: who the sandwich rule's sub-networks learn from besides the labels.  One piece per file in this
package, registered in :data:`TEACHERS` under the name ``task.teacher.name`` gives; a new teacher is a new file.

A teacher gives each distilled sub-network its loss (:meth:`Teacher.student_loss`, from the largest
sub-network's detached logits of the same mini-batch) and may add a term to every sub-network's loss
(:meth:`Teacher.extra_loss`); it saves what it keeps across steps under its own checkpoint key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from losses.config import LossConfig
from losses.divergences import KDLoss
from losses.student import StudentLoss
from trainer.state.pieces import PieceState
from typedconfig import Registry

TEACHERS = Registry("teacher", package="trainer.teachers")


@dataclass(kw_only=True, slots=True)
class TeacherConfig:
    """``task.teacher``: ``{name: NAME, ...}`` with the keys of the teacher named (see ``docs/architecture.md``)."""

    registry: ClassVar[Registry] = TEACHERS
    name: str = "inplace"
    """The teacher (``inplace``: the largest sub-network's detached logits, AlphaNet; ``voted``,
    ``inplace_and_voted``: SD-DARTS's vote of earlier snapshots)."""


@dataclass(slots=True)
class TeacherContext:
    """What a teacher is built from."""

    loss: LossConfig
    label_loss: nn.Module
    kd_loss: KDLoss | None
    """``loss.kd_loss`` built (None: ``none``, the students learn from the labels)."""
    make_supernet: Callable[[], nn.Module]
    """A new supernet of the trained one's shape, on its device."""
    module: nn.Module
    """The trained supernet."""
    steps_per_epoch: int


class Teacher(PieceState):
    """Base of the teacher pieces."""

    Config: ClassVar[type[TeacherConfig]]

    def __init__(self, config: TeacherConfig, context: TeacherContext):
        self.config = config
        self.label_loss, self.kd_loss, self.kd_weight = context.label_loss, context.kd_loss, context.loss.kd_weight
        loss = context.loss
        self.student = StudentLoss(
            context.label_loss,
            context.kd_loss,
            kd_weight=loss.kd_weight,
            label_mix=loss.kd_label_mix,
            warmup_steps=round(loss.kd_warmup_epochs * context.steps_per_epoch),
            gate=loss.kd_gate,
        )
        """The distilled sub-networks' loss against a teacher's logits, with ``loss.kd_*``'s levers."""
        self.step = 0
        """The optimizer step being taken (set by :meth:`begin`)."""
        self.notes: list[str] = []
        """Printed when training starts."""

    @staticmethod
    def check_config(config: Any, space: Any, source: str) -> None:
        """Raise a ConfigError naming the key when the run config cannot use this piece."""

    def describe(self) -> str:
        """A few words for the start line ('' for the default)."""
        return ""

    @property
    def clean_targets(self) -> bool:
        """Whether the sandwich step takes the teacher's logits from a second, unregularised forward of the
        largest sub-network (after its label step) instead of its regularised one."""
        return False

    def begin(self, step: int = 0) -> None:
        """Before the sub-networks of a mini-batch of optimizer step ``step`` run."""
        self.step = step

    def student_loss(
        self, name: str, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, metrics: dict
    ) -> torch.Tensor:
        """The loss of distilled sub-network ``name`` (its ``logits``; ``teacher``: the largest sub-network's
        detached logits); ``metrics`` takes what to log."""
        raise NotImplementedError

    def extra_loss(self, name: str, arch, logits: torch.Tensor, inputs: torch.Tensor, metrics: dict):
        """A term added to every sub-network's loss, or None."""
        return None

    def after_step(self, step: int, module: nn.Module) -> dict[str, torch.Tensor]:
        """After optimizer step ``step``; returns metrics to log."""
        return {}


def build_teacher(config: TeacherConfig, context: TeacherContext) -> Teacher:
    return TEACHERS.get(config.name)(config, context)
