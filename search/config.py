"""The search section: evolutionary search under FLOPs constraints (AlphaNet §4.2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(kw_only=True, slots=True)
class SearchConfig:
    min_mflops: float = 0.0
    """Lower end of the FLOPs range every candidate must satisfy."""
    max_mflops: float = 1e9
    """Upper end of the FLOPs range."""
    population: int = 512
    """Random sub-networks of generation 0."""
    parents: int = 128
    """Parents per generation, the best of each FLOPs bucket in turn."""
    crossovers: int = 128
    """Uniform-crossover children per generation."""
    mutations: int = 128
    """Mutation children per generation."""
    iterations: int = 20
    """Generations after the initial population."""
    mutation_prob: float = 0.2
    """Per-gene probability that a mutation redraws it."""
    bucket_mflops: float = 10.0
    """Width of the FLOPs buckets for parent selection and the per-bucket front."""
    calib_batches: int = 32
    """Training batches (per rank, loaded once per resolution) for BN recalibration of every candidate."""
    val_batches: int | None = None
    """Validation batches used per candidate (None: the whole split)."""
    batch_size: int | None = None
    """Batch size for calibration/validation (None: the run's data.batch_size)."""
    seed: int = 0
    """Seed of the search (population, parents, crossover, mutation)."""
    mark_models: Path | None = None
    """A model table (e.g. configs/alphanet_models.yaml) whose models are evaluated and marked on the plot."""
    output: str = "search"
    """Output folder name inside the run folder."""

    def __post_init__(self) -> None:
        for name in ("population", "parents", "calib_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"search.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("crossovers", "mutations", "iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"search.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_mflops < self.max_mflops:
            raise ValueError(f"search needs 0 <= min_mflops < max_mflops, got {self.min_mflops} and {self.max_mflops}")
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise ValueError(f"search.mutation_prob must be in [0, 1], got {self.mutation_prob}")
        if self.bucket_mflops <= 0:
            raise ValueError(f"search.bucket_mflops must be positive, got {self.bucket_mflops}")


@dataclass(kw_only=True, slots=True)
class SearchFile:
    """A search YAML: just the ``search:`` section (model and data come from the run folder)."""

    search: SearchConfig = field(default_factory=SearchConfig)
