"""The sandwich step as the step benches run it (``step_throughput``, ``gpu_step``, ``host_allocator``,
``compile_levers``): the supernet, the engines that step it, its batches, its timing and the memory it holds.

The project's modules are imported inside the functions: a bench sets process-wide things first (the host
allocator of ``host_allocator``'s workers must be set before any import starts a thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

LR = 0.01
"""Every engine's learning rate (a step's cost does not depend on it)."""


def model_config(space: str):
    """The supernet the benches train: ``space``, 10 classes for the tiny space, ImageNet's 1,000 otherwise."""
    from models import ModelConfig

    return ModelConfig(search_space=space, num_classes=10 if space == "tiny" else 1000)


class Built(NamedTuple):
    """An engine ready to step the supernet ``module``."""

    engine: Any
    """Forward (a call), ``backward(loss)``, ``step()``, ``train()``, ``set_gradient_accumulation_boundary``."""
    module: torch.nn.Module
    optimizer: Any
    reduction: Callable[[], contextlib.AbstractContextManager]
    """The context around a step's backward passes (``trainer.runtime.engine.one_reduction`` for DeepSpeed)."""


class PlainEngine:
    """Engine interface over a plain module: one flat all-reduce of every gradient at the last backward
    (averaged over the process group's ranks), clip by value, one optimizer step."""

    def __init__(self, net, optimizer):
        self.net, self.optimizer, self.boundary = net, optimizer, False

    def __call__(self, x):
        return self.net(x)

    def set_gradient_accumulation_boundary(self, boundary):
        self.boundary = boundary

    def backward(self, loss):
        loss.backward()
        if self.boundary:
            import torch.distributed as dist
            from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

            from trainer.runtime.collectives import all_reduce_

            params = list(self.net.parameters())
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
            flat = all_reduce_(_flatten_dense_tensors(grads))
            flat /= dist.get_world_size()
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)

    def step(self):
        from trainer.sections import OptimizerConfig

        torch.nn.utils.clip_grad_value_(self.net.parameters(), OptimizerConfig().grad_clip_value)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self):
        self.net.train()


def plain(net: torch.nn.Module, device: torch.device | None = None) -> Built:
    """Our math in a hand-written loop (:class:`PlainEngine`) with the trainer's optimizer, on ``device``."""
    from trainer.runtime.engine import build_optimizer
    from trainer.sections import OptimizerConfig

    if device is not None:
        net = net.to(device)
    optimizer = build_optimizer(net, OptimizerConfig(), lr=LR)
    return Built(PlainEngine(net, optimizer), net, optimizer, contextlib.nullcontext)


def deepspeed(net: torch.nn.Module, *, micro_batch: int, world_size: int, **trainer_options) -> Built:
    """The engine ``trainer/run.py`` trains with (``trainer.runtime.engine.build_engine``), configured by the
    ``engine:`` / ``optimizer:`` options given (``bf16=True``: ``precision: bf16``), stepping as the trainer does
    (``trainer.runtime.engine.one_reduction``)."""
    from trainer.runtime.engine import build_engine, one_reduction
    from trainer.sections import EngineConfig, OptimizerConfig

    if trainer_options.pop("bf16", False):
        trainer_options["precision"] = "bf16"
    engine_keys = set(EngineConfig.__dataclass_fields__)
    ec = EngineConfig(**{k: v for k, v in trainer_options.items() if k in engine_keys})
    oc = OptimizerConfig(**{k: v for k, v in trainer_options.items() if k not in engine_keys})
    built = build_engine(net, ec, oc, micro_batch=micro_batch, world_size=world_size, lr=LR)
    return Built(built.engine, built.module, built.engine.optimizer, lambda: one_reduction(built.engine, ec))


def fresh_engine(make: Callable[[torch.nn.Module], Built], config, options: dict) -> Built:
    """``make(net)`` on a supernet of ``config`` with fresh weights (seed 0), laid out as ``options`` says: its
    ``channels_last`` and ``activation_checkpointing`` are taken out of it."""
    from models import build_supernet

    torch.manual_seed(0)
    net = build_supernet(config)
    net.channels_last = options.pop("channels_last", True)
    net.activation_checkpointing = options.pop("activation_checkpointing", False)
    return make(net)


def start_ranks():
    """This process's rank in the process group, started as the trainer starts it: (its environment, its device)."""
    from trainer.runtime.distributed import init_distributed, resolve
    from trainer.sections import EngineConfig

    env = resolve()
    return env, init_distributed(env, EngineConfig().dist_timeout_s)


def sandwich_step(*, bf16_autocast: bool = False):
    """The trainer's sandwich step (``trainer.tasks.sandwich.SandwichStep``) with the default ``loss:`` section."""
    from losses import LossConfig, build_kd_loss, build_label_loss
    from trainer.tasks.sandwich import SandwichStep

    config = LossConfig()
    return SandwichStep(build_label_loss(config), build_kd_loss(config), bf16_autocast=bf16_autocast)


def random_batch(
    batch: int, resolution: int, num_classes: int, generator: torch.Generator, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal images and uniform labels drawn from ``generator``."""
    images = torch.randn(batch, 3, resolution, resolution, generator=generator, device=device)
    return images, torch.randint(0, num_classes, (batch,), generator=generator, device=device)


def timed_step(engine, module, reduction, sandwich, subnets, images, labels) -> tuple[float, float, int]:
    """One sandwich step as the trainer runs it (``reduction()`` around the backward passes, then the optimizer
    step), between barriers of all ranks: its wall-clock seconds, and this process's kernel seconds and minor
    page faults meanwhile."""
    import torch.distributed as dist

    dist.barrier()
    usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    engine.train()
    with reduction():
        sandwich(engine, module, subnets, images, labels)
    engine.step()
    dist.barrier()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return seconds, after.ru_stime - usage.ru_stime, after.ru_minflt - usage.ru_minflt


def reset_peak_rss() -> None:
    """Free what the previous engine left (garbage, and the C allocator's free pages, which it would otherwise
    keep resident), then restart the kernel's high-water mark of this process's resident memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """The high-water mark of this process's resident memory (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0
