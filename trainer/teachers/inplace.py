"""AlphaNet's in-place teacher: the largest sub-network's detached logits of the same mini-batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.teachers import TEACHERS, Teacher, TeacherConfig


@dataclass(kw_only=True, slots=True)
class InplaceConfig(TeacherConfig):
    name: str = "inplace"


@TEACHERS.register("inplace")
class InplaceTeacher(Teacher):
    """``kd_weight`` · KD(teacher ‖ student); with ``loss.kd_loss: none`` the students learn from the labels."""

    Config = InplaceConfig

    def student_loss(
        self, name: str, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, metrics: dict
    ) -> torch.Tensor:
        if self.kd_loss is None:
            return self.label_loss(logits, labels)
        loss = self.kd_loss(logits, teacher)
        if self.kd_weight != 1.0:
            loss = self.kd_weight * loss
        metrics[f"kd_div/{name}"] = self.kd_loss.divergence(logits.detach(), teacher).mean()
        return loss

    @classmethod
    def of(cls, label_loss, kd_loss, kd_weight: float = 1.0) -> InplaceTeacher:
        """The in-place teacher from its losses alone (benches and tests that run a sandwich step by hand)."""
        teacher = cls.__new__(cls)
        teacher.config, teacher.notes = InplaceConfig(), []
        teacher.label_loss, teacher.kd_loss, teacher.kd_weight = label_loss, kd_loss, kd_weight
        return teacher
