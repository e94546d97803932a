"""The sandwich rule (AlphaNet Alg. 1) as a task: one supernet, N sub-networks per mini-batch, gradients summed.

1. The largest sub-network at the largest resolution, dropout and drop-connect on, label-smoothed CE;
   its detached logits are the in-place teacher's.
2. N−2 middle sub-networks (drawn by the ``task.sampler`` piece) and the smallest, regularisation off, each
   at its own resolution (bicubic rescale of the batch on the device), learning from the ``task.teacher``
   piece (by default: KD against the in-place teacher).
3. The ``model.sharing`` piece may change which weights each sub-network runs.
Every backward pass accumulates into the same gradients; DeepSpeed reduces them once, at the last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import torch

from data_pipeline.device_transforms import normalize, rescale
from losses import build_kd_loss, build_label_loss
from losses.divergences import KDLoss
from models import build_supernet, subnet_cost
from trainer.runtime.evaluate import collect_calibration, evaluate_arch
from trainer.runtime.precision import forward_logits
from trainer.samplers import SAMPLERS, SamplerConfig, SamplerContext, Subnet, build_sampler, sandwich_subnets
from trainer.sharing import SharingContext, build_sharing, check_sharing_config
from trainer.tasks import TASKS, RunContext, Task, TaskConfig
from trainer.teachers import TEACHERS, Teacher, TeacherConfig, TeacherContext, build_teacher
from trainer.teachers.inplace import InplaceTeacher
from typedconfig import Range, check_ranges


@dataclass(kw_only=True, slots=True)
class SandwichConfig(TaskConfig):
    """``task: {name: sandwich, ...}``: train a supernet with the sandwich rule."""

    name: str = "sandwich"
    num_subnets: Annotated[int, Range(ge=2)] = 4
    """N of the sandwich rule: largest + (N−2) middle + smallest, one optimizer step."""
    sampler: SamplerConfig = field(default_factory=lambda: SAMPLERS.config_class("uniform")())
    """How the N−2 middle sub-networks are drawn: ``uniform`` (every gene independently, the AlphaNet
    reference), ``attentive`` (AttentiveNAS: the best or worst of a few candidates near a FLOPs target, by their
    loss on the mini-batch); every piece registered in ``trainer.samplers`` (docs/architecture.md)."""
    teacher: TeacherConfig = field(default_factory=lambda: TEACHERS.config_class("inplace")())
    """Who teaches the sub-networks: ``inplace`` (the largest sub-network's detached logits, AlphaNet),
    ``voted`` (SD-DARTS: the vote of the last K snapshots of the supernet replaces the in-place teacher once a
    snapshot exists) or ``inplace_and_voted`` (both terms)."""

    def __post_init__(self) -> None:
        check_ranges(self, "task")


class SandwichStep:
    """Forward + backward of every sub-network of one mini-batch; returns per-sub-network metrics
    (detached tensors, so that no device sync happens until they are logged)."""

    def __init__(
        self,
        label_loss: torch.nn.Module,
        kd_loss: KDLoss | None = None,
        kd_weight: float = 1.0,
        *,
        teacher: Teacher | None = None,
        bf16_autocast: bool = False,
    ):
        """``teacher``: the distilled sub-networks' teacher piece; None: the in-place teacher with ``kd_loss``
        (None: the students train on the labels too) weighted by ``kd_weight``.  ``bf16_autocast``: forward
        passes under bf16 autocast, losses and gradients in fp32."""
        self.label_loss = label_loss
        self.teacher = teacher if teacher is not None else InplaceTeacher.of(label_loss, kd_loss, kd_weight)
        self.bf16_autocast = bf16_autocast

    def __call__(
        self,
        engine,
        supernet,
        subnets: list[Subnet],
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        last_micro_batch: bool = True,
        step: int = 0,
    ) -> dict[str, torch.Tensor]:
        metrics: dict[str, torch.Tensor] = {}
        teacher = None
        dtype = next(supernet.parameters()).dtype
        self.teacher.begin(step)
        for i, subnet in enumerate(subnets):
            is_teacher = subnet.role == "teacher"
            local = {} if subnet.candidates is None else {"candidates": subnet.candidates, "routing": subnet.routing}
            supernet.set_arch(subnet.arch, regularize=is_teacher, **local)
            inputs = rescale(images, subnet.arch.resolution).to(dtype)
            logits = forward_logits(engine, inputs, bf16_autocast=self.bf16_autocast)
            if is_teacher:
                loss = self.label_loss(logits, labels)
                teacher = logits.detach()
            else:
                loss = self.teacher.student_loss(subnet.name, logits, teacher, labels, metrics)
            extra = self.teacher.extra_loss(subnet.name, subnet.arch, logits, inputs, metrics)
            if extra is not None:
                loss = loss + extra
            metrics[f"loss/{subnet.name}"] = loss.detach().float()
            engine.set_gradient_accumulation_boundary(last_micro_batch and i == len(subnets) - 1)
            engine.backward(loss)
            if is_teacher and self.teacher.clean_targets:
                supernet.set_arch(subnet.arch, regularize=False, **local)
                with torch.no_grad():
                    teacher = forward_logits(engine, inputs, bf16_autocast=self.bf16_autocast).detach()
        return metrics


@TASKS.register("sandwich")
class SandwichTask(Task):
    """A supernet trained with the sandwich rule; validated on its largest and smallest sub-networks after
    BatchNorm recalibration."""

    Config = SandwichConfig

    def __init__(self, config, *, rank: int, world: int, device: torch.device):
        super().__init__(config, rank=rank, world=world, device=device)
        self.trained = build_supernet(config.model)
        self.space = self.trained.space
        self.trained.activation_checkpointing = config.engine.activation_checkpointing  # runtime, not hashed

    @staticmethod
    def check_config(config, space, source: str) -> None:
        SAMPLERS.get(config.task.sampler.name).check_config(config, space, source)
        TEACHERS.get(config.task.teacher.name).check_config(config, space, source)
        check_sharing_config(config, space, source)

    def attach(self, run: RunContext) -> None:
        super().attach(run)
        config, task = run.config, run.config.task
        model, loss = config.model, config.loss
        label_loss, kd_loss = build_label_loss(loss), build_kd_loss(loss)
        space, classes = self.space, model.num_classes
        mflops = lambda arch: subnet_cost(space, arch, classes).mflops  # noqa: E731
        self.sampler = build_sampler(task.sampler, SamplerContext(space, config.seed, mflops))
        device = run.device
        self.teacher = build_teacher(
            task.teacher,
            TeacherContext(
                loss,
                label_loss,
                kd_loss,
                lambda: build_supernet(model).to(device),
                run.module,
                run.data.steps_per_epoch,
            ),
        )
        self.sharing = build_sharing(
            SharingContext(
                run.module, model, run.data.steps_per_epoch, run.data.total_steps, label_loss, run.rank, run.world
            )
        )
        self.sandwich = SandwichStep(label_loss, teacher=self.teacher, bf16_autocast=config.engine.bf16_autocast)
        self.notes += self.teacher.notes + self.sharing.notes
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None

    def describe(self) -> str:
        what = f"{self.space.name} supernet"
        if self.trained.activation_checkpointing:
            what += " (activation checkpointing)"
        for piece in (self.teacher, self.sampler):
            if piece.describe():
                what += f" ({piece.describe()})"
        return what

    def _first_batch(self, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's first mini-batch, normalised on the device (for the pieces that score or route by it)."""
        if self._first is None:
            data, first = self.run.config.data, batches[0].to(self.run.device)
            self._first = normalize(first.images, data.mean, data.std), first.labels
        return self._first

    def step(self, batches: list, lr: float, step: int) -> dict[str, torch.Tensor]:
        run = self.run
        self._first = None
        middle = self.sampler.middle(
            run.config.task.num_subnets - 2, lambda arch: self._proxy_loss(arch, *self._first_batch(batches))
        )
        subnets = sandwich_subnets(self.space, middle)
        run.engine.train()
        prepared: dict[str, torch.Tensor] = {}
        if self.sharing.needs_first_batch:
            subnets, prepared = self.sharing.prepare(step, subnets, *self._first_batch(batches), lr)

        def one(batch, images: torch.Tensor, last: bool) -> dict[str, torch.Tensor]:
            return self.sandwich(
                run.engine, run.module, subnets, images, batch.labels, last_micro_batch=last, step=step
            )

        return {**prepared, **self.over_mini_batches(batches, one)}

    @torch.no_grad()
    def _proxy_loss(self, arch, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """A sampler's score of ``arch``: its label loss on the mini-batch, no gradient, no dropout."""
        module = self.run.module
        module.set_arch(arch, regularize=False)
        dtype = next(module.parameters()).dtype
        return self.sandwich.label_loss(self.run.engine(rescale(images, arch.resolution).to(dtype)), labels)

    def after_step(self, step: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        metrics = dict(self.teacher.after_step(step, self.run.module))
        lines: list[str] = []
        if self.sharing.needs_first_batch:
            fixed, lines = self.sharing.after_step(step, *self._first)
            metrics.update({k: torch.tensor(v) for k, v in fixed.items()})
        return metrics, lines

    def validate(self, epoch: int) -> dict[str, dict[str, float]]:
        run, data = self.run, self.run.config.data
        run.data.calib_loader.set_epoch(epoch)
        calib = collect_calibration(
            run.data.calib_loader, run.config.eval.calib_batches, run.device, data.mean, data.std
        )
        results = {}
        for name, arch in (("largest", self.space.largest()), ("smallest", self.space.smallest())):
            run.data.val_loader.set_epoch(0)
            results[name] = evaluate_arch(
                run.module,
                arch,
                calib,
                run.data.val_loader,
                zero_stage=run.config.engine.zero_stage,
                mean=data.mean,
                std=data.std,
                device=run.device,
            )
        return results

    def client_state(self) -> dict[str, Any]:
        return {
            **self.sampler.client_state(),
            "search_space": self.space.to_dict(),
            **self.teacher.client_state(),
            **self.sharing.client_state(),
        }

    def rank_state(self) -> dict[str, Any]:
        return {**self.sampler.rank_state(), **self.teacher.rank_state(), **self.sharing.rank_state()}

    def load_state(self, client: dict[str, Any], rank: dict[str, Any]) -> None:
        for piece in (self.sampler, self.teacher, self.sharing):
            piece.load_state(client, rank)
