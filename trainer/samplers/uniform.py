"""The AlphaNet reference's sampler: every gene of every middle sub-network drawn uniformly and independently."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.samplers import SAMPLERS, Probe, Sampler, SamplerConfig


@dataclass(kw_only=True, slots=True)
class UniformConfig(SamplerConfig):
    name: str = "uniform"


@SAMPLERS.register("uniform")
class UniformSampler(Sampler):
    Config = UniformConfig

    def middle(self, count: int, probe: Probe) -> list:
        return [self.arch_sampler.random() for _ in range(count)]
