"""Samplers: how the sandwich rule draws its N−2 middle sub-networks.  One piece per file in this package,
registered in :data:`SAMPLERS` under the name ``task.sampler.name`` gives; a new sampler is a new file.

Every sampler draws from one seeded :class:`models.ArchSampler` (the same draws on every rank) and saves its
state under the checkpoint key ``sampler``; a sampler that scores candidates averages the scores over ranks so
that every rank keeps the same ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from models import ArchSampler
from trainer.state.pieces import PieceState
from typedconfig import Registry

SAMPLERS = Registry("sampler", package="trainer.samplers")

Role = Literal["teacher", "student"]


@dataclass(frozen=True, slots=True)
class Subnet:
    """One sub-network of a sandwich step."""

    name: str
    """Metric name: ``largest``, ``random1``.., ``smallest``."""
    arch: Any
    role: Role = "student"
    """The teacher trains on labels (regularised) and its detached logits teach the students."""
    candidates: tuple[int, ...] | None = None
    """Local weight sharing: the candidate of every supernet block (None: the supernet's own choice)."""
    routing: dict[int, dict[int, float]] | None = None
    """Local weight sharing: gradient routing to other candidates (see ``AlphaNetSupernet.routing``)."""


def sandwich_subnets(space, middle: list) -> list[Subnet]:
    """largest (the teacher), the ``middle`` architectures as random1.., smallest."""
    randoms = [Subnet(f"random{i + 1}", arch) for i, arch in enumerate(middle)]
    return [Subnet("largest", space.largest(), role="teacher"), *randoms, Subnet("smallest", space.smallest())]


def sample_sandwich(space, sampler: ArchSampler, n: int, middle: list | None = None) -> list[Subnet]:
    """largest, n−2 uniform draws of ``sampler`` (or ``middle``), smallest: every rank draws the same from the
    same sampler state."""
    middle = middle if middle is not None else [sampler.random() for _ in range(n - 2)]
    return sandwich_subnets(space, middle)


Probe = Callable[[Any], torch.Tensor]
"""The label loss of an architecture on the step's first mini-batch (no gradient, no regularisation)."""


@dataclass(kw_only=True, slots=True)
class SamplerConfig:
    """``task.sampler``: ``{name: NAME, ...}`` with the keys of the sampler named (see ``docs/architecture.md``)."""

    registry: ClassVar[Registry] = SAMPLERS
    name: str = "uniform"
    """The sampler: a name registered in :data:`SAMPLERS` (``uniform``, ``attentive``, ...)."""


@dataclass(slots=True)
class SamplerContext:
    """What a sampler is built from."""

    space: Any
    """The supernet's search space."""
    seed: int
    mflops: Callable[[Any], float]
    """FLOPs (millions) of an architecture of ``space``."""


class Sampler(PieceState):
    """Base of the sampler pieces: a seeded :class:`ArchSampler` and its checkpoint state."""

    Config: ClassVar[type[SamplerConfig]]

    def __init__(self, config: SamplerConfig, context: SamplerContext):
        self.config = config
        self.space = context.space
        self.mflops = context.mflops
        self.arch_sampler = ArchSampler(context.space, context.seed)

    @staticmethod
    def check_config(config: Any, space: Any, source: str) -> None:
        """Raise a ConfigError naming the key when the run config cannot use this piece."""

    def describe(self) -> str:
        """A few words for the start line ('' for the default)."""
        return ""

    def middle(self, count: int, probe: Probe) -> list:
        """The step's ``count`` middle architectures; ``probe(arch)`` scores one on this rank's mini-batch."""
        raise NotImplementedError

    def client_state(self) -> dict[str, Any]:
        return {"sampler": self.arch_sampler.state_dict()}

    def load_state(self, client: dict[str, Any], rank: dict[str, Any]) -> None:
        self.arch_sampler.load_state_dict(client["sampler"])


def build_sampler(config: SamplerConfig, context: SamplerContext) -> Sampler:
    return SAMPLERS.get(config.name)(config, context)
