"""SGD with Nesterov momentum, element-wise gradient clipping and a non-finite-gradient guard.

Clipping by value and the finiteness check live inside ``step()`` so that they act on exactly the
gradients DeepSpeed hands to the optimizer: whole tensors under ZeRO 0, this rank's partition of the
reduced gradients under ZeRO 1–3.  Ranks agree on skipping through one all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from trainer.runtime.collectives import all_reduce_


class ClippedSGD(torch.optim.SGD):
    def __init__(self, params, *, lr: float, momentum: float, nesterov: bool, clip_value: float | None):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov)
        self.clip_value = clip_value
        self.last_step_skipped = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        # One flag computed where the gradients are, read once: a per-tensor test in Python would wait for the
        # GPU once per parameter.
        finite = [torch.isfinite(g).all() for g in grads]
        bad = (~torch.stack(finite)).any().float().reshape(1) if finite else torch.zeros(1)
        all_reduce_(bad, dist.ReduceOp.MAX)
        self.last_step_skipped = bool(bad.item())
        if self.last_step_skipped:
            return None
        if self.clip_value is not None:
            for g in grads:
                g.clamp_(-self.clip_value, self.clip_value)
        return super().step(closure)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only; none on BatchNorm parameters and biases."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
            (no_decay if is_norm or name == "bias" else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
