"""``model.sharing: local``: local weight sharing (Distribution Consistent NAS, Pan et al. 2023) as a sharing
rule of the sandwich task; the algorithm itself is :class:`trainer.sharing._local_schedule.LocalSharing`."""

from __future__ import annotations

from models.families import family_of
from trainer.sharing import SHARING, Sharing, SharingContext
from trainer.sharing._local_schedule import LocalSharing
from typedconfig import ConfigError


@SHARING.register("local")
class LocalSharingRule(Sharing):
    """``model.sharing: local``: :class:`LocalSharing` around the sandwich; its meta-networks are each rank's
    checkpoint state (``local_sharing``), the assignment the checkpoint's client state (same key)."""

    needs_first_batch = True

    def __init__(self, context: SharingContext):
        super().__init__(context)
        self.local = LocalSharing(
            context.module,
            context.model.sharing,
            steps_per_epoch=context.steps_per_epoch,
            total_steps=context.total_steps,
            label_loss=context.label_loss,
            rank=context.rank,
            world=context.world,
        )
        self.notes.append(self.local.describe())

    @staticmethod
    def check_config(config, space, source: str) -> None:
        """Local weight sharing runs on a family with per-layer operators, with the in-place teacher and uniform
        sampling of the sandwich task, and not under ZeRO-3."""
        task = config.task
        sandwich = task.name == "sandwich"
        problems = {
            "model.search_space": f"the {family_of(space).name} family's supernet has no per-layer candidates"
            if not family_of(space).supports_local_sharing
            else "",
            "task": "a one-network task trains one network" if not sandwich else "",
            "engine.zero_stage": "ZeRO-3 partitions the candidates it routes gradients between"
            if config.engine.zero_stage == 3
            else "",
            "task.teacher": f"the {task.teacher.name} teacher's snapshots have no assignment"
            if sandwich and task.teacher.name != "inplace"
            else "",
            "task.sampler": f"{task.sampler.name} sampling would choose the pair it must force"
            if sandwich and task.sampler.name != "uniform"
            else "",
            "task.num_subnets": "a pair of middle sub-networks is needed (num_subnets >= 4)"
            if sandwich and task.num_subnets < 4 and config.model.sharing.assignment == "learned"
            else "",
        }
        for key, problem in problems.items():
            if problem:
                raise ConfigError(f"not with model.sharing: local: {problem}", key=key, source=source)

    def prepare(self, step, subnets, images, labels, lr):
        return self.local.prepare(step, subnets, images, labels, lr)

    def after_step(self, step, images, labels):
        fixed = self.local.after_step(step, images, labels)
        lines = []
        if fixed:
            lines.append(
                f"local sharing: layer {int(fixed['local/layer_decided'])} fixed at step {step}, "
                f"{fixed['local/candidate0_share']:.0%} of its sampled archs on candidate 0"
            )
        return fixed, lines

    def client_state(self):
        return {"local_sharing": self.local.assignment.to_dict()}

    def rank_state(self):
        return {"local_sharing": self.local.state_dict()}

    def load_state(self, client, rank):
        step = client.get("global_step")
        self.local.load_state_dict(rank["local_sharing"], client["local_sharing"], step=step)
