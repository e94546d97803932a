"""The search section: evolutionary search under FLOPs constraints (AlphaNet §4.2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from typedconfig import Range, check_ranges


@dataclass(kw_only=True, slots=True)
class SearchConfig:
    min_mflops: Annotated[float, Range(ge=0)] = 0.0
    """Lower end of the FLOPs range every candidate must satisfy."""
    max_mflops: float = 1e9
    """Upper end of the FLOPs range."""
    population: Annotated[int, Range(ge=1)] = 512
    """Random sub-networks of generation 0."""
    parents: Annotated[int, Range(ge=1)] = 128
    """Parents per generation, the best of each FLOPs bucket in turn."""
    crossovers: Annotated[int, Range(ge=0)] = 128
    """Uniform-crossover children per generation."""
    mutations: Annotated[int, Range(ge=0)] = 128
    """Mutation children per generation."""
    iterations: Annotated[int, Range(ge=0)] = 20
    """Generations after the initial population."""
    mutation_prob: Annotated[float, Range(ge=0, le=1)] = 0.2
    """Per-gene probability that a mutation redraws it."""
    bucket_mflops: Annotated[float, Range(gt=0)] = 10.0
    """Width of the FLOPs buckets for parent selection and the per-bucket front."""
    calib_batches: Annotated[int, Range(ge=1)] = 32
    """Training batches (per rank, loaded once per resolution) for BN recalibration of every candidate."""
    marked_calib_batches: Annotated[int | None, Range(ge=1)] = None
    """Calibration batches for the marked models (the reference recalibrates its final A0–A6 evaluation on
    64 × 256 images, its search candidates on 32 × 256); None: ``calib_batches``."""
    val_batches: Annotated[int | None, Range(ge=1)] = None
    """Validation batches used per candidate (None: the whole split)."""
    batch_size: Annotated[int | None, Range(ge=1)] = None
    """Batch size for calibration/validation (None: the run's data.batch_size)."""
    seed: Annotated[int, Range(ge=0)] = 0
    """Seed of the search (population, parents, crossover, mutation)."""
    mark_models: Path | None = None
    """A model table (e.g. configs/alphanet_models.yaml) whose models are evaluated and marked on the plot."""
    output: str = "search"
    """Output folder name inside the run folder."""
    dist_timeout_s: Annotated[float, Range(gt=0)] = 900.0
    """Seconds a collective may wait for the other ranks (multi-rank searches) before giving up."""

    def __post_init__(self) -> None:
        check_ranges(self, "search")
        if not self.output or Path(self.output).name != self.output or self.output in (".", ".."):
            raise ValueError(f"search.output must be a folder name inside the run folder, got {self.output!r}")
        if not self.min_mflops < self.max_mflops:
            raise ValueError(f"search needs min_mflops < max_mflops, got {self.min_mflops} and {self.max_mflops}")


@dataclass(kw_only=True, slots=True)
class SearchFile:
    """A search YAML: just the ``search:`` section (model and data come from the run folder)."""

    search: SearchConfig = field(default_factory=SearchConfig)
