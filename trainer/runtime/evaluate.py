"""Evaluation of a sub-network: extract it, recalibrate BatchNorm on training batches, measure top-1/top-5.

One path serves the trainer's validation and the search's candidates:
:func:`collect_calibration` loads the calibration batches once; :func:`evaluate_arch` extracts a
standalone copy of the sub-network (the supernet is untouched), recalibrates its BN statistics
(running statistics reset, momentum None = cumulative average, train mode, no_grad forward) and
scores it.  With ``across_ranks`` the statistics are averaged over ranks and the counts summed, so
every rank evaluates the same model on its share of the validation split (the trainer); without it a
rank evaluates alone (the search, which splits candidates rather than data).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.batch import Batch
from data_pipeline.device_transforms import normalize, rescale
from data_pipeline.loader import ResumableLoader
from models import ArchConfig, StaticSubnet, extract_subnet
from trainer.runtime.collectives import all_reduce_


def gathered(module: nn.Module, zero_stage: int):
    """All of ``module``'s parameters materialised (ZeRO-3 partitions them)."""
    if zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def collect_calibration(
    loader: ResumableLoader, count: int, device, mean: Sequence[float], std: Sequence[float]
) -> list[torch.Tensor]:
    """The first ``count`` batches of ``loader``'s current epoch, on ``device``, normalised."""
    batches = []
    for batch in loader:
        batches.append(normalize(batch.to(device).images, mean, std))
        if len(batches) >= count:
            break
    return batches


def _reduce_mean(tensors: Iterable[torch.Tensor]) -> None:
    world = dist.get_world_size()
    for tensor in tensors:
        all_reduce_(tensor)
        tensor /= world


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
        _reduce_mean(stat for bn in bns for stat in (bn.running_mean, bn.running_var))
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
    if across_ranks:
        all_reduce_(totals)
    return totals


def calibrated_subnet(
    supernet: nn.Module, arch: ArchConfig, calib: Iterable[torch.Tensor], *, zero_stage: int = 0, across_ranks: bool
) -> StaticSubnet:
    """A standalone fp32 copy of ``arch`` with BN statistics recalibrated on ``calib`` (normalised batches at
    any resolution; those already at ``arch.resolution`` are used as they are)."""
    with gathered(supernet, zero_stage):
        static = extract_subnet(supernet, arch).float()
    recalibrate_bn(static, (rescale(images, arch.resolution) for images in calib), across_ranks=across_ranks)
    return static


def evaluate_arch(
    supernet: nn.Module,
    arch: ArchConfig,
    calib: Iterable[torch.Tensor],
    val_batches: Iterable[Batch],
    *,
    mean,
    std,
    device,
    zero_stage: int = 0,
    across_ranks: bool = True,
) -> dict[str, float]:
    """Top-1/top-5 (%) and sample count of ``arch`` after BN recalibration (see the module docstring)."""
    static = calibrated_subnet(supernet, arch, calib, zero_stage=zero_stage, across_ranks=across_ranks)
    return percentages(
        accuracy_counts(static, val_batches, arch.resolution, mean, std, device, across_ranks=across_ranks)
    )


def percentages(counts: torch.Tensor) -> dict[str, float]:
    """Top-1/top-5 (%) and sample count from :func:`accuracy_counts`' [correct top-1, correct top-5, samples]."""
    correct1, correct5, total = counts.tolist()
    return {"top1": 100.0 * correct1 / max(total, 1), "top5": 100.0 * correct5 / max(total, 1), "samples": int(total)}
