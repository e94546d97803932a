"""All-reduces that work under every backend: the one way the trainer and the search reduce a tensor.

NCCL reduces only GPU tensors; gloo takes CPU and GPU tensors.  The trainer reduces small tensors made on
the CPU (a skip flag, the numbers of a log line, accuracy counts) next to GPU tensors (BatchNorm statistics,
meta-network gradients).  :func:`all_reduce_` moves a tensor the backend cannot take to the device it can,
and copies the result back, so no call site needs to know the backend.  Found on the first GPU run
(``scripts/gpu_check.sh``): every NCCL run stopped at its first optimizer step with "No backend type
associated with device type cpu".
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def collective_device(tensor: torch.Tensor) -> torch.device:
    """Where the default process group can reduce ``tensor``: the current GPU under NCCL when ``tensor`` is
    not on a GPU, else where it is."""
    if tensor.device.type != "cuda" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """``tensor`` reduced over every rank in place (on :func:`collective_device`, the result copied back), and
    returned; unchanged without a process group.  A world of one rank reduces too, so a one-GPU run takes the
    same path as a cluster's."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    device = collective_device(tensor)
    if device == tensor.device:
        dist.all_reduce(tensor, op=op)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op)
    return tensor.copy_(moved)
