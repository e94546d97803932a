"""Attentive sampling of the sandwich's middle sub-networks (AttentiveNAS, Wang et al. 2021, "BestUp"/"WorstUp").

For each middle slot: a FLOPs target (the bucket of a uniformly drawn sub-network, so targets follow the
space's own FLOPs distribution), ``candidates`` sub-networks drawn until their FLOPs fall in that bucket
(after ``max_trials`` misses the last draw is taken anyway, as the reference does), each scored by a cheap
proxy — the label loss of the current mini-batch, no gradient, averaged over ranks — and the best
(``best_up``: lowest loss) or the worst (``worst_up``: highest) trains.  Every draw comes from the seeded
:class:`ArchSampler` (checkpointed), and the scores are all-reduced, so every rank picks the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from trainer.runtime.ranks import averaged_over_ranks
from trainer.samplers import SAMPLERS, Probe, Sampler, SamplerConfig, SamplerContext
from typedconfig import Range, check_ranges


@dataclass(kw_only=True, slots=True)
class AttentiveConfig(SamplerConfig):
    """``task.sampler: {name: attentive, ...}``."""

    name: str = "attentive"
    candidates: Annotated[int, Range(ge=1)] = 3
    """Sub-networks drawn per middle slot (the reference's ``num_trials``: 3)."""
    choice: Literal["best_up", "worst_up"] = "best_up"
    """Train the candidate with the lowest (``best_up``) or highest (``worst_up``) mini-batch loss."""
    bucket_mflops: Annotated[float | None, Range(gt=0)] = None
    """Width of a FLOPs target bucket (the reference: 25 MFLOPs); null: 1/40 of the space's FLOPs range."""
    max_trials: Annotated[int, Range(ge=1)] = 100
    """Draws per candidate before one outside the target bucket is accepted."""

    def __post_init__(self) -> None:
        check_ranges(self, "task.sampler")


@SAMPLERS.register("attentive")
class AttentiveSampler(Sampler):
    """Candidates near a FLOPs target, and the choice among them by a proxy score."""

    Config = AttentiveConfig

    def __init__(self, config: AttentiveConfig, context: SamplerContext):
        super().__init__(config, context)
        lo, hi = self.mflops(self.space.smallest()), self.mflops(self.space.largest())
        self.bucket_mflops = config.bucket_mflops or max(hi - lo, 1e-9) / 40
        self.misses = 0

    def describe(self) -> str:
        return f"{self.config.choice} of {self.config.candidates} attentive sampling"

    def middle(self, count: int, probe: Probe) -> list:
        return attentive_middle(self, count, probe)

    def bucket(self, arch) -> int:
        return round(self.mflops(arch) / self.bucket_mflops)

    def candidates(self) -> tuple[int, list]:
        """(target bucket, ``candidates`` sub-networks in it); a candidate that missed the bucket ``max_trials``
        times is the last draw (counted in ``misses``)."""
        target = self.bucket(self.arch_sampler.random())
        chosen = []
        for _ in range(self.config.candidates):
            for _trial in range(self.config.max_trials):
                arch = self.arch_sampler.random()
                if self.bucket(arch) == target:
                    break
            else:
                self.misses += 1
            chosen.append(arch)
        return target, chosen

    def choose(self, candidates: Sequence, losses: torch.Tensor) -> tuple[int, object]:
        """(index, arch) of the candidate the configured choice trains, given each one's proxy loss."""
        index = int(losses.argmin() if self.config.choice == "best_up" else losses.argmax())
        return index, candidates[index]


def attentive_middle(sampler: AttentiveSampler, slots: int, proxy_loss: Callable[[object], torch.Tensor]) -> list:
    """The middle sub-networks of one step: per slot, the chosen one of ``sampler.candidates()`` scored by
    ``proxy_loss(arch)`` (a scalar tensor on this rank's mini-batch)."""
    middle = []
    for _ in range(slots):
        _, candidates = sampler.candidates()
        losses = averaged_over_ranks(torch.stack([proxy_loss(arch).detach().float() for arch in candidates])).cpu()
        middle.append(sampler.choose(candidates, losses)[1])
    return middle
