"""The one place that builds the training engine: optimizer → DeepSpeed config → ``deepspeed.initialize``.

Used by the Trainer, ``bench/step_throughput.py`` and the equivalence test's worker, so that what is
measured and tested is what trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import deepspeed
from torch import nn

from trainer.ds_config import build_ds_config
from trainer.optim import ClippedSGD, param_groups
from trainer.safe_checkpoint import install_guarded_engine
from trainer.trainer_config import TrainerConfig


@dataclass(frozen=True, slots=True)
class Engine:
    engine: Any
    """The DeepSpeed engine: call it, ``backward``, ``step``."""
    module: nn.Module
    """The model inside the engine (``set_arch`` goes here)."""
    optimizer: ClippedSGD
    """The client optimizer: its param groups carry the learning rate set every step."""


def build_optimizer(model: nn.Module, tc: TrainerConfig, lr: float) -> ClippedSGD:
    """Nesterov SGD with element-wise clipping and the non-finite guard; no weight decay on BN and biases."""
    return ClippedSGD(
        param_groups(model, tc.weight_decay),
        lr=lr,
        momentum=tc.momentum,
        nesterov=tc.nesterov,
        clip_value=tc.grad_clip_value,
    )


def build_engine(model: nn.Module, tc: TrainerConfig, *, micro_batch: int, world_size: int, lr: float) -> Engine:
    """``model`` wrapped in a DeepSpeed engine configured from ``tc`` (the process group must exist)."""
    optimizer = build_optimizer(model, tc, lr)
    config = build_ds_config(tc, micro_batch=micro_batch, world_size=world_size)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    install_guarded_engine(engine)  # checkpoints: safe loads, atomic writes, failures reported not raised
    return Engine(engine, engine.module, optimizer)
