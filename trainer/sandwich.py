"""The sandwich rule (AlphaNet Alg. 1): one mini-batch, N sub-networks, gradients summed.

1. The largest sub-network at the largest resolution, dropout and drop-connect on, label-smoothed CE;
   its detached logits are the teacher's.
2. N−2 random sub-networks and the smallest, regularisation off, each at its own resolution (bicubic
   rescale of the batch on the device), KD loss against the teacher.
Every backward pass accumulates into the same gradients; DeepSpeed reduces them once, at the last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from data_pipeline.device_transforms import rescale
from losses.divergences import KDLoss
from models import ArchConfig, ArchSampler, SearchSpace
from trainer.precision import forward_logits

Role = Literal["teacher", "student"]


@dataclass(frozen=True, slots=True)
class Subnet:
    name: str
    """Metric name: ``largest``, ``random1``.., ``smallest``."""
    arch: ArchConfig
    role: Role = "student"
    """The teacher trains on labels (regularised) and its detached logits teach the students."""
    candidates: tuple[int, ...] | None = None
    """Local weight sharing: the candidate of every supernet block (None: the supernet's own choice)."""
    routing: dict[int, dict[int, float]] | None = None
    """Local weight sharing: gradient routing to other candidates (see ``AlphaNetSupernet.routing``)."""


def sample_sandwich(space: SearchSpace, sampler: ArchSampler, n: int, middle: list | None = None) -> list[Subnet]:
    """largest (the teacher), random1..random{n-2}, smallest — every rank draws the same from the same
    sampler state; ``middle``: the n−2 middle sub-networks chosen otherwise (attentive sampling)."""
    middle = middle if middle is not None else [sampler.random() for _ in range(n - 2)]
    randoms = [Subnet(f"random{i + 1}", arch) for i, arch in enumerate(middle)]
    return [Subnet("largest", space.largest(), role="teacher"), *randoms, Subnet("smallest", space.smallest())]


class SandwichStep:
    """Forward + backward of every sub-network of one mini-batch; returns per-sub-network metrics
    (detached tensors, so that no device sync happens until they are logged)."""

    def __init__(
        self,
        label_loss: torch.nn.Module,
        kd_loss: KDLoss | None,
        kd_weight: float = 1.0,
        *,
        voter=None,
        vote_loss: KDLoss | None = None,
        vote_weight: float = 1.0,
        inplace: bool = True,
        bf16_autocast: bool = False,
    ):
        """``kd_loss`` None: the students train on the labels too (no distillation); ``kd_weight``: γ.
        ``voter`` (a :class:`trainer.voted.SnapshotVote`): once it holds a snapshot, every sub-network also
        learns ``vote_weight`` · ``vote_loss`` from the snapshots' vote; ``inplace`` False: the students then
        drop the in-place term (the vote replaces the largest sub-network as their teacher).
        ``bf16_autocast``: forward passes under bf16 autocast, losses and gradients in fp32."""
        self.label_loss = label_loss
        self.kd_loss = kd_loss
        self.kd_weight = kd_weight
        self.voter, self.vote_loss, self.vote_weight, self.inplace = voter, vote_loss, vote_weight, inplace
        self.bf16_autocast = bf16_autocast

    def __call__(
        self,
        engine,
        supernet,
        subnets: list[Subnet],
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        last_micro_batch: bool = True,
    ) -> dict[str, torch.Tensor]:
        metrics: dict[str, torch.Tensor] = {}
        teacher = None
        dtype = next(supernet.parameters()).dtype
        voting = self.voter is not None and self.voter.ready
        for i, subnet in enumerate(subnets):
            is_teacher = subnet.role == "teacher"
            local = {} if subnet.candidates is None else {"candidates": subnet.candidates, "routing": subnet.routing}
            supernet.set_arch(subnet.arch, regularize=is_teacher, **local)
            inputs = rescale(images, subnet.arch.resolution).to(dtype)
            logits = forward_logits(engine, inputs, bf16_autocast=self.bf16_autocast)
            if is_teacher:
                loss = self.label_loss(logits, labels)
                teacher = logits.detach()
            elif self.kd_loss is None:
                loss = self.label_loss(logits, labels)
            elif voting and not self.inplace:
                loss = logits.new_zeros((), dtype=torch.float32)
            else:
                loss = self.kd_loss(logits, teacher)
                if self.kd_weight != 1.0:
                    loss = self.kd_weight * loss
                metrics[f"kd_div/{subnet.name}"] = self.kd_loss.divergence(logits.detach(), teacher).mean()
            if voting:
                vote = self.vote_loss(logits, self.voter.vote(subnet.arch, inputs))
                metrics[f"vote_kd/{subnet.name}"] = vote.detach().float()
                loss = loss + self.vote_weight * vote
            metrics[f"loss/{subnet.name}"] = loss.detach().float()
            engine.set_gradient_accumulation_boundary(last_micro_batch and i == len(subnets) - 1)
            engine.backward(loss)
        return metrics
