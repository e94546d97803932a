"""Validation of a sub-network: extract it, recalibrate BatchNorm on training batches, measure top-1/top-5.

Recalibration works on a fresh standalone copy (the supernet is untouched): running statistics reset,
momentum None (cumulative average), train mode, no_grad forward over the calibration batches; the
statistics are then averaged over ranks so every rank evaluates the same model on its share of the
validation split, and the counts are summed over ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.batch import Batch
from data_pipeline.rescale import normalize, rescale
from models.search_space import ArchConfig
from models.static import extract_subnet


def gathered(module: nn.Module, zero_stage: int):
    """All of ``module``'s parameters materialised (ZeRO-3 partitions them)."""
    if zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], *, across_ranks: bool = True) -> int:
    """Cumulative-average BN statistics over ``batches`` (already normalised and rescaled); returns count.
    With ``across_ranks`` the statistics are then averaged over ranks (a collective)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    count = 0
    for images in batches:
        model(images)
        count += 1
    if across_ranks and dist.is_initialized() and dist.get_world_size() > 1:
        for bn in bns:
            for stat in (bn.running_mean, bn.running_var):
                dist.all_reduce(stat)
                stat /= dist.get_world_size()
    model.eval()
    return count


@torch.no_grad()
def accuracy_counts(
    model: nn.Module, batches: Iterable[Batch], resolution: int, mean, std, device, *, across_ranks: bool = True
) -> torch.Tensor:
    """[correct top-1, correct top-5, samples] (eval padding excluded), summed over ranks if ``across_ranks``."""
    totals = torch.zeros(3, dtype=torch.float64)
    model.eval()
    for batch in batches:
        batch = batch.to(device)
        logits = model(rescale(normalize(batch.images, mean, std), resolution))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(batch.labels[:, None])
        valid = batch.valid
        totals[0] += (hit[:, 0] & valid).sum().item()
        totals[1] += (hit.any(dim=1) & valid).sum().item()
        totals[2] += valid.sum().item()
    if across_ranks and dist.is_initialized():
        dist.all_reduce(totals)
    return totals


def evaluate_arch(
    supernet: nn.Module,
    arch: ArchConfig,
    calib: list[torch.Tensor],
    val_batches: Iterable[Batch],
    *,
    zero_stage: int,
    mean,
    std,
    device,
) -> dict[str, float]:
    with gathered(supernet, zero_stage):
        static = extract_subnet(supernet, arch).float()
    recalibrate_bn(static, (rescale(images, arch.resolution) for images in calib))
    correct1, correct5, total = accuracy_counts(static, val_batches, arch.resolution, mean, std, device).tolist()
    return {"top1": 100.0 * correct1 / max(total, 1), "top5": 100.0 * correct5 / max(total, 1), "samples": int(total)}
