"""``task: {name: one_network, ...}``: one network per step instead of the sandwich (AlphaNet §4.3): the student,
trained on the labels and/or distilled from a fixed teacher, validated as it is, written to ``RUN/final``.

``config.py``: the section; ``networks.py``: where a network comes from and how it is saved; ``distill.py``: the
fixed teacher, its logit cache and the step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline import build_loader
from losses import build_kd_loss, build_label_loss
from models import load_subnet, save_subnet
from models.export import ARCH, WEIGHTS
from trainer.config_keys import RESOLVED_CONFIG_NAME, config_hash
from trainer.runtime.evaluate import accuracy_counts, collect_calibration, gathered, percentages
from trainer.runtime.ranks import agree
from trainer.state.checkpoint import latest_tag
from trainer.tasks import TASKS, RunContext, Task
from trainer.tasks.one_network.config import NetworkSource, OneNetworkConfig
from trainer.tasks.one_network.distill import FixedTeacher, StandaloneStep, teacher_logit_cache, weights_fingerprint
from trainer.tasks.one_network.networks import FINAL_DIR, Network, load_network, replace_classifier, save_network
from typedconfig import ConfigError, load_yaml, to_mapping


def _train_ready(module: nn.Module, dropout: float) -> nn.Module:
    """BatchNorm layers left as cumulative averages by a recalibration track a moving average again (PyTorch's
    0.1), and our models' dropout is the run's ``model.dropout``."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.momentum is None:
            layer.momentum = 0.1
    if isinstance(getattr(module, "dropout", None), float):
        module.dropout = dropout
    return module.train()


PINNED_TEACHER_DIR = "teacher"
"""``RUN/teacher``: the teacher a ``{run: ..., arch: ...}`` source gave at the run's first start (an export folder:
``arch.yaml``, which records what produced it, + ``model.safetensors``)."""


def _pinned_teacher(config, load, *, rank: int, device, notes: list[str]) -> Network:
    """The teacher of a ``{run: ..., arch: ...}`` source, fixed for the life of the run folder.

    Such a teacher is the source run's newest checkpoint with BatchNorm recalibrated on ``eval.calib_batches``
    training batches of this run: rebuilt at every start, it changed when that operational key changed on resume
    (issue 37 item 4), or when the source run had trained on.  So the first start saves it into ``RUN/teacher``
    with what produced it; later starts load it while ``task.teacher`` is unchanged (an allowed change of
    ``task.teacher`` builds and saves a new one), and check its weights against the recorded hash."""
    source, folder = config.task.teacher, Path(config.run_dir) / PINNED_TEACHER_DIR
    identity = json.dumps(to_mapping(source), sort_keys=True)
    recorded = {}
    if (folder / ARCH).is_file() and (folder / WEIGHTS).is_file():
        recorded = load_yaml(folder / ARCH).get("pinned_teacher")
        recorded = recorded if isinstance(recorded, dict) else {}
    # every rank reuses it or none does: the rebuild's calibration is collective
    reuse = not agree(recorded.get("source") != identity)[0]
    if reuse:
        module = load_subnet(folder).to(device)
        if weights_fingerprint(module) != recorded.get("weights"):
            raise ConfigError(
                f"the teacher's weights in {folder / WEIGHTS} are not those recorded in {folder / ARCH}: remove "
                f"{folder} to rebuild the teacher from {source.describe()}"
            )
        notes.append(
            f"teacher: {source.describe()} as this run first built it ({folder}: BatchNorm recalibrated on "
            f"{recorded.get('calib_batches')} batches, from checkpoint weights {recorded.get('checkpoint')})"
        )
        return Network(module, module.arch.resolution, source.describe())
    network = load(source)
    if rank == 0:
        pinned = {
            "source": identity,
            "calib_batches": config.eval.calib_batches,
            "checkpoint": latest_tag(Path(source.run) / "checkpoints"),
            "weights": weights_fingerprint(network.module),
        }
        save_subnet(network.module, folder, extra={"pinned_teacher": pinned})
    return network


def build_student_and_teacher(config, *, rank: int, world: int, device, notes: list[str] | None = None):
    """(student :class:`Network`, :class:`FixedTeacher` or None) of a run config whose task is ``one_network``;
    BatchNorm of networks taken from a supernet run is recalibrated on ``eval.calib_batches`` training
    batches (loaded once, shared by both).  Such a teacher is built once per run folder and then reused (see
    :func:`_pinned_teacher`); ``notes`` receives a line saying so."""
    standalone, data, model = config.task, config.data, config.model
    batches: list[torch.Tensor] = []

    def calibration() -> list[torch.Tensor]:
        if not batches:
            loader = build_loader(data, data.train_split, train=True, seed=config.seed + 1, rank=rank, world_size=world)
            batches.extend(collect_calibration(loader, config.eval.calib_batches, device, data.mean, data.std))
        return batches

    def load(source: NetworkSource) -> Network:
        return load_network(
            source, model, base_resolution=data.base_resolution, calibration=calibration, rank=rank, device=device
        )

    student = load(standalone.student)
    if standalone.new_classifier:
        replace_classifier(student.module, model.num_classes)
    if student.num_classes != model.num_classes:
        raise ConfigError(
            f"the student ({student.description}) has {student.num_classes} outputs but model.num_classes is "
            f"{model.num_classes}: set standalone.new_classifier to train a new classifier"
        )
    student.module = _train_ready(student.module, model.dropout)
    teacher = None
    if standalone.teacher is not None:
        if standalone.teacher.run is not None:
            network = _pinned_teacher(config, load, rank=rank, device=device, notes=[] if notes is None else notes)
        else:
            network = load(standalone.teacher)
        teacher = FixedTeacher(network)
        if teacher.network.num_classes != model.num_classes:
            raise ConfigError(
                f"the teacher ({teacher.network.description}) has {teacher.network.num_classes} outputs, the student "
                f"{model.num_classes}"
            )
    return student, teacher


@TASKS.register("one_network")
class OneNetworkTask(Task):
    """``label_weight``·CE + ``loss.kd_weight``·KD(fixed teacher ‖ student) on one network."""

    Config = OneNetworkConfig

    def __init__(self, config, *, rank: int, world: int, device: torch.device):
        super().__init__(config, rank=rank, world=world, device=device)
        self.student, self.teacher = build_student_and_teacher(
            config, rank=rank, world=world, device=device, notes=self.notes
        )
        self.trained = self.student.module

    @staticmethod
    def check_config(config, space, source: str) -> None:
        task = config.task
        if task.teacher is not None and config.loss.kd_loss == "none":
            raise ConfigError("a teacher needs a KD loss (loss.kd_loss is none)", key="task.teacher", source=source)
        loss = config.loss
        levers = {"kd_warmup_epochs": loss.kd_warmup_epochs, "kd_label_mix": loss.kd_label_mix}
        levers = [k for k, v in levers.items() if v] + (["kd_gate"] if loss.kd_gate != "none" else [])
        if task.teacher is not None and levers:
            raise ConfigError(
                f"loss.{levers[0]} is a lever of the sandwich task's distilled sub-networks; a one-network run "
                "mixes the labels in with task.label_weight",
                key=f"loss.{levers[0]}",
                source=source,
            )
        if task.teacher is None and task.teacher_logits == "cached":
            raise ConfigError("cached teacher logits need a teacher", key="task.teacher_logits", source=source)
        if config.engine.activation_checkpointing:
            raise ConfigError(
                "activation checkpointing is implemented in the supernets' forward, not for one network",
                key="engine.activation_checkpointing",
                source=source,
            )
        if config.model.sharing.name != "global":
            raise ConfigError("one network has no shared weights", key="model.sharing", source=source)

    def attach(self, run: RunContext) -> None:
        super().attach(run)
        config, task, loss = run.config, run.config.task, run.config.loss
        if self.teacher is not None and task.teacher_logits == "cached":
            self._cache_teacher_logits(run)
        kd = build_kd_loss(loss) if self.teacher is not None else None
        self.single_step = StandaloneStep(
            build_label_loss(loss),
            kd,
            kd_weight=loss.kd_weight,
            label_weight=task.label_weight,
            bf16_autocast=config.engine.bf16_autocast,
        )

    def _cache_teacher_logits(self, run: RunContext) -> None:
        """``task.teacher_logits: cached``: the teacher's logits on every training image, computed once."""
        config, data = run.config, run.config.data
        eval_loader = build_loader(
            data, data.train_split, train=False, seed=config.seed, rank=run.rank, world_size=run.world
        )
        # The teacher's weights, not only its config: a file replaced at the same path is another teacher.
        weights = weights_fingerprint(self.teacher.network.module)
        key = config_hash({"teacher": to_mapping(config.task.teacher), "data": to_mapping(data), "weights": weights})
        samples = run.data.train_loader.num_samples
        self.teacher.cache, missing = teacher_logit_cache(
            self.teacher,
            eval_loader,
            samples,
            run.run_dir,
            key=key,
            mean=data.mean,
            std=data.std,
            device=run.device,
            rank=run.rank,
            world=run.world,
        )
        self.notes.append(f"teacher logits cached for {samples - missing} training images")

    def describe(self) -> str:
        return f"standalone {self.student.description}" + (
            f" distilled from {self.teacher.network.description}" if self.teacher else ""
        )

    def step(self, batches: list, lr: float, step: int) -> dict[str, torch.Tensor]:
        self.run.engine.train()

        def one(batch, images: torch.Tensor, last: bool) -> dict[str, torch.Tensor]:
            teacher_logits = self.teacher(images, batch.indices) if self.teacher else None
            resolution = self.student.resolution
            return self.single_step(
                self.run.engine, resolution, images, batch.labels, teacher_logits, last_micro_batch=last
            )

        return self.over_mini_batches(batches, one)

    def validate(self, epoch: int) -> dict[str, dict[str, float]]:
        """Top-1/top-5 of the student as it is (no BN recalibration: its statistics were tracked in training),
        with rank 0's BatchNorm statistics on every rank: what the checkpoint and the final export hold."""
        run, data = self.run, self.run.config.data
        with gathered(run.module, run.config.engine.zero_stage):
            if dist.is_initialized() and run.world > 1:
                for buffer in run.module.buffers():
                    dist.broadcast(buffer, src=0)
            run.data.val_loader.set_epoch(0)
            counts = accuracy_counts(
                run.module, run.data.val_loader, self.student.resolution, data.mean, data.std, run.device
            )
        run.module.train()
        return {"student": percentages(counts)}

    def finish(self, is_main: bool) -> Path | None:
        """The student goes to ``RUN/final`` (an ``export:`` source of a later run)."""
        with gathered(self.run.module, self.run.config.engine.zero_stage):
            if is_main:
                preprocessing = self.run.config.data.preprocessing(self.student.resolution)
                return save_network(self.student, self.run.run_dir / FINAL_DIR, preprocessing)
        return None


__all__ = ["RESOLVED_CONFIG_NAME", "NetworkSource", "OneNetworkConfig", "OneNetworkTask", "build_student_and_teacher"]
