"""AlphaNet's in-place teacher: the largest sub-network's detached logits of the same mini-batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from losses.student import StudentLoss
from trainer.teachers import TEACHERS, Teacher, TeacherConfig


@dataclass(kw_only=True, slots=True)
class InplaceConfig(TeacherConfig):
    name: str = "inplace"
    clean_logits: bool = False
    """Take the teacher's logits from a second forward of the largest sub-network with dropout and drop-connect
    off (BatchNorm on the batch's statistics, no gradient): one more forward per step.  False (AlphaNet): the
    logits of its regularised forward on the labels."""


@TEACHERS.register("inplace")
class InplaceTeacher(Teacher):
    """``kd_weight`` · KD(teacher ‖ student), with the label levers of ``loss.kd_*`` (:class:`StudentLoss`); with
    ``loss.kd_loss: none`` the students learn from the labels."""

    Config = InplaceConfig

    @property
    def clean_targets(self) -> bool:
        return self.config.clean_logits

    def student_loss(
        self, name: str, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, metrics: dict
    ) -> torch.Tensor:
        return self.student(logits, teacher, labels, self.step, metrics, name)

    @classmethod
    def of(cls, label_loss, kd_loss, kd_weight: float = 1.0) -> InplaceTeacher:
        """The in-place teacher from its losses alone (benches and tests that run a sandwich step by hand)."""
        teacher = cls.__new__(cls)
        teacher.config, teacher.notes = InplaceConfig(), []
        teacher.label_loss, teacher.kd_loss, teacher.kd_weight = label_loss, kd_loss, kd_weight
        teacher.student, teacher.step = StudentLoss(label_loss, kd_loss, kd_weight=kd_weight), 0
        return teacher
