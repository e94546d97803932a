"""FLOPs-uniform sampling: each middle sub-network's FLOPs target is drawn uniformly between the smallest and the
largest sub-network's FLOPs, then random architectures are drawn until one lands within ``tolerance`` of the
target (after ``max_trials`` draws, the closest one drawn trains).  Uniform genes put the FLOPs where most gene
combinations lie (for the tiny space: low in the range); this spreads the trained sub-networks more evenly over
it.  Every draw comes from the seeded sampler stream (checkpointed), so every rank trains the same sub-networks and a resumed run continues the same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from trainer.samplers import SAMPLERS, Probe, Sampler, SamplerConfig, SamplerContext
from typedconfig import Range, check_ranges

_TARGET_STEPS = 2**31
"""Resolution of a drawn target: an integer in [0, 2³¹) of the sampler stream, scaled to the FLOPs range."""


@dataclass(kw_only=True, slots=True)
class FlopsUniformConfig(SamplerConfig):
    """``task.sampler: {name: flops_uniform, ...}``."""

    name: str = "flops_uniform"
    tolerance: Annotated[float, Range(gt=0, le=1)] = 0.05
    """How near the target an architecture must be, as a fraction of the space's FLOPs range."""
    max_trials: Annotated[int, Range(ge=1)] = 100
    """Draws per middle sub-network before the closest one drawn is taken."""

    def __post_init__(self) -> None:
        check_ranges(self, "task.sampler")


@SAMPLERS.register("flops_uniform")
class FlopsUniformSampler(Sampler):
    Config = FlopsUniformConfig

    def __init__(self, config: FlopsUniformConfig, context: SamplerContext):
        super().__init__(config, context)
        self.low, self.high = self.mflops(self.space.smallest()), self.mflops(self.space.largest())
        self.misses = 0
        """Middle sub-networks that missed their target by more than the tolerance."""

    def describe(self) -> str:
        return f"FLOPs-uniform sampling within {self.config.tolerance:.0%} of the range"

    def target(self) -> float:
        """A FLOPs target (millions), uniform in [smallest, largest]."""
        return self.low + (self.high - self.low) * self.arch_sampler.index(_TARGET_STEPS) / _TARGET_STEPS

    def near(self, target: float):
        """The first architecture drawn within the tolerance of ``target``, or the closest of ``max_trials``."""
        width = self.config.tolerance * (self.high - self.low)
        best, best_gap = None, float("inf")
        for _ in range(self.config.max_trials):
            arch = self.arch_sampler.random()
            gap = abs(self.mflops(arch) - target)
            if gap <= width:
                return arch
            if gap < best_gap:
                best, best_gap = arch, gap
        self.misses += 1
        return best

    def middle(self, count: int, probe: Probe) -> list:
        return [self.near(self.target()) for _ in range(count)]
