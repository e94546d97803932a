"""The one place that builds the training engine: optimizer → DeepSpeed config → ``deepspeed.initialize``.

Used by the Trainer, ``bench/step_throughput.py`` and the equivalence test's worker, so that what is
measured and tested is what trains.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from torch import nn

from trainer.runtime.ds_config import build_ds_config
from trainer.runtime.optim import ClippedSGD, param_groups
from trainer.sections import EngineConfig, OptimizerConfig
from trainer.state.safe_checkpoint import install_guarded_engine


@dataclass(frozen=True, slots=True)
class Engine:
    engine: Any
    """The DeepSpeed engine: call it, ``backward``, ``step``."""
    module: nn.Module
    """The model inside the engine (``set_arch`` goes here)."""
    optimizer: ClippedSGD
    """The client optimizer: its param groups carry the learning rate set every step."""


def build_optimizer(model: nn.Module, tc: OptimizerConfig, lr: float) -> ClippedSGD:
    """Nesterov SGD with element-wise clipping and the non-finite guard; no weight decay on BN and biases."""
    return ClippedSGD(
        param_groups(model, tc.weight_decay),
        lr=lr,
        momentum=tc.momentum,
        nesterov=tc.nesterov,
        clip_value=tc.grad_clip_value,
    )


def mark_zero3_leaves(model: nn.Module, gather: str = "network") -> list[type[nn.Module]]:
    """Under ZeRO-3, gather parameters for the whole network (``gather="network"``) or a whole block
    (``"block"``) at once, instead of for each layer.

    ZeRO-3 installs its gather/release hooks on every module that holds parameters; in a supernet those are
    the many small layers of every block (a conv, its BatchNorm, its SE), and the hooks' own work is most of
    ZeRO-3's cost on a CPU.  A DeepSpeed *leaf module* (``deepspeed.utils.set_z3_leaf_module``) is hooked alone
    and gathers everything under it together.

    - ``"network"``: the network is the one leaf.  Its parameters are gathered when a forward pass starts and
      when its backward pass starts, and released after each.  DeepSpeed reduces a leaf's gradients from the
      leaf's full backward hook, which fires when the gradient of the leaf's input is computed; a network's
      input (the images) does not require one, and the hook would then fire before any parameter had its
      gradient.  So a forward pre-hook (:func:`_input_requires_grad`) makes the input a leaf tensor that
      requires a gradient whenever gradients are being recorded, which costs the first layer's input gradient.
    - ``"block"``: each block is a leaf (our networks name their block class in ``zero3_leaf_types``).  A
      sub-network uses or skips a block whole, so nothing more is gathered than it needs.  Measured on 2 CPU
      ranks: ZeRO-3 went from 0.44–0.48× to 0.57× the plain loop (before ``network`` existed).

    Returns the classes marked."""
    from deepspeed.utils import set_z3_leaf_module, set_z3_leaf_modules

    if gather == "network":
        set_z3_leaf_module(model, True)
        if not getattr(model, "_zero3_input_hook", False):  # once, however often an engine is built on it
            model.register_forward_pre_hook(_input_requires_grad)
            model._zero3_input_hook = True
        return [type(model)]
    leaf_types = list(getattr(model, "zero3_leaf_types", ()))
    if leaf_types:
        set_z3_leaf_modules(model, leaf_types)
    return leaf_types


def _input_requires_grad(module: nn.Module, args: tuple) -> tuple | None:
    """While gradients are recorded, a floating-point first argument that requires no gradient is replaced by a
    detached alias of it (same storage, no copy) that does: the network's ZeRO-3 leaf hooks then fire after its
    backward."""
    if not (torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor)):
        return None
    first = args[0]
    if first.requires_grad or not first.is_floating_point():
        return None
    return (first.detach().requires_grad_(), *args[1:])


def build_engine(
    model: nn.Module, ec: EngineConfig, oc: OptimizerConfig, *, micro_batch: int, world_size: int, lr: float
) -> Engine:
    """``model`` wrapped in a DeepSpeed engine configured from the engine and optimizer sections (the process group
    must exist)."""
    if ec.zero_stage == 3:
        mark_zero3_leaves(model, ec.zero3_gather)
    optimizer = build_optimizer(model, oc, lr)
    config = build_ds_config(ec, oc, micro_batch=micro_batch, world_size=world_size)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    install_guarded_engine(engine)  # checkpoints: safe loads, atomic writes, failures reported not raised
    return Engine(engine, engine.module, optimizer)


@contextmanager
def one_reduction(engine: Any, tc: EngineConfig) -> Iterator[None]:
    """Around the backward passes of one optimizer step: under ZeRO-2/3 with ``tc.coalesce_grad_reduction``, they
    accumulate on each rank and DeepSpeed reduces them once when the block ends, rather than after each one
    (``DeepSpeedEngine.coalesce_grad_reduction``); the optimizer step follows the block.  Other stages reduce
    once at the step's last backward anyway (ZeRO-0/1, the gradient accumulation boundary the trainer sets),
    and for them, or any other engine, this does nothing."""
    if not (tc.coalesce_grad_reduction and tc.zero_stage in (2, 3)):
        yield
        return
    with engine.coalesce_grad_reduction():
        yield
    engine.set_gradient_accumulation_boundary(True)  # the block restores the flag it found; the step comes next
