"""Weight sharing: how the sandwich's sub-networks share the supernet's weights.  One piece per file in this
package, registered in :data:`SHARING` under the name ``model.sharing.name`` gives (the weights' layout is the
model's, so the choice stays in the model section, hashed into checkpoints); a new rule is a new file.

A rule may change the step's sub-networks before they run (:meth:`Sharing.prepare`), act after the optimizer
step (:meth:`Sharing.after_step`), check the config it needs (:meth:`Sharing.check_config`) and save its own
state under its own checkpoint key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from models.config import ModelConfig
from trainer.state.pieces import PieceState
from typedconfig import Registry

SHARING = Registry("weight sharing", package="trainer.sharing")


@dataclass(slots=True)
class SharingContext:
    """What a sharing rule is built from."""

    module: nn.Module
    """The trained supernet."""
    model: ModelConfig
    steps_per_epoch: int
    total_steps: int
    label_loss: nn.Module
    rank: int
    world: int


class Sharing(PieceState):
    """Base of the sharing pieces: every sub-network slices the one weight tensor of each layer."""

    needs_first_batch: ClassVar[bool] = False
    """Whether :meth:`prepare` and :meth:`after_step` look at the step's first mini-batch."""

    def __init__(self, context: SharingContext):
        self.notes: list[str] = []

    @staticmethod
    def check_config(config: Any, space: Any, source: str) -> None:
        """Raise a ConfigError naming the key when the run config cannot use this rule."""

    def prepare(self, step: int, subnets: list, images, labels, lr: float) -> tuple[list, dict[str, torch.Tensor]]:
        """The step's sub-networks as they run, and metrics to log; ``images`` (normalised) and ``labels``: the
        step's first mini-batch (None unless :attr:`needs_first_batch`)."""
        return subnets, {}

    def after_step(self, step: int, images, labels) -> tuple[dict[str, float], list[str]]:
        """After optimizer step ``step``: (metrics, lines to print)."""
        return {}, []


@SHARING.register("global")
class GlobalSharing(Sharing):
    """One weight tensor per layer, sliced by every sub-network (AlphaNet, OFA, BigNAS)."""


def build_sharing(context: SharingContext) -> Sharing:
    return SHARING.get(context.model.sharing.name, key="model.sharing.name")(context)


def check_sharing_config(config: Any, space: Any, source: str) -> None:
    SHARING.get(config.model.sharing.name, key="model.sharing.name", source=source).check_config(config, space, source)
