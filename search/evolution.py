"""Evolutionary search under a FLOPs range (AlphaNet §4.2), independent of how candidates are scored.

Generation 0 is a population of random sub-networks whose FLOPs lie in [min, max]; each later
generation takes parents from the best candidates of every FLOPs bucket and adds uniform-crossover
and mutation children, each resampled until it satisfies the FLOPs constraint and is new.  The
whole process is a pure function of the seed and the scores, so a rerun that looks scores up in
``candidates.jsonl`` regenerates the same candidates and only evaluates the missing ones.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from models.families import Arch, Space, arch_from_dict
from models.flops import subnet_cost
from models.sampler import ArchSampler


@dataclass(frozen=True, slots=True)
class Candidate:
    arch: Arch
    mflops: float
    params_m: float
    top1: float
    top5: float

    def to_record(self) -> dict:
        return {
            "arch": self.arch.to_dict(),
            "mflops": self.mflops,
            "params_m": self.params_m,
            "top1": self.top1,
            "top5": self.top5,
        }

    @classmethod
    def from_record(cls, record: dict) -> Candidate:
        return cls(arch_from_dict(record["arch"]), record["mflops"], record["params_m"], record["top1"], record["top5"])


def arch_key(arch: Arch) -> str:
    return "|".join(str(value) for value in arch.to_dict().values())


ENUMERATE_LIMIT = 10_000
"""A space of at most this many sub-networks is listed whole (a slimmable space's widths and resolutions)."""
POOL_TRIES = 100
"""Draws of a listed space before an unseen architecture is taken from the list instead."""


class SpaceExhausted(ValueError):
    """No new sub-network within the FLOPs range after ``max_tries`` draws: the search asks for more distinct
    architectures than the range seems to hold."""


class FlopsConstrainedSampler:
    """Random / mutated / crossed architectures resampled until their FLOPs lie in [lo, hi]."""

    def __init__(
        self,
        space: Space,
        sampler: ArchSampler,
        lo: float,
        hi: float,
        num_classes: int,
        max_tries: int = 10000,
        pool: list[Arch] | None = None,
    ):
        self.space, self.sampler, self.lo, self.hi = space, sampler, lo, hi
        self.num_classes, self.max_tries = num_classes, max_tries
        self.pool = pool
        """Every architecture within the range, when the space is small enough to list: a draw that keeps
        giving architectures already seen (crossing two widths of a width-only space gives one of them) takes
        an unseen one of these instead."""

    def mflops(self, arch: Arch) -> float:
        return subnet_cost(self.space, arch, self.num_classes).mflops

    def ok(self, arch: Arch) -> bool:
        return self.lo <= self.mflops(arch) <= self.hi

    def draw(self, make: Callable[[], Arch], seen: set[str]) -> Arch:
        tries = self.max_tries if self.pool is None else min(self.max_tries, POOL_TRIES)
        for _ in range(tries):
            arch = make()
            if self.ok(arch) and arch_key(arch) not in seen:
                seen.add(arch_key(arch))
                return arch
        fresh = [arch for arch in self.pool or [] if arch_key(arch) not in seen]
        if fresh:
            arch = fresh[self.sampler.index(len(fresh))]
            seen.add(arch_key(arch))
            return arch
        raise SpaceExhausted(
            f"no new architecture within [{self.lo}, {self.hi}] MFLOPs after {tries} draws "
            f"({len(seen)} drawn so far); widen the range (search.min_mflops, search.max_mflops) or ask for fewer "
            "(search.population, search.crossovers, search.mutations, search.iterations)"
        )


def every_arch(space, limit: int) -> list | None:
    """Every sub-network of ``space`` when it holds at most ``limit`` (a width-only slimmable space), else None."""
    genes = space.choices()
    if math.prod(len(choices) for _, choices in genes) > limit:
        return None
    names = [name for name, _ in genes]
    return [
        space.largest().with_genes(dict(zip(names, values))) for values in itertools.product(*(c for _, c in genes))
    ]


def select_parents(candidates: list[Candidate], count: int, bucket_mflops: float) -> list[Candidate]:
    """The best of every FLOPs bucket in turn (best first within buckets) until ``count`` are chosen."""
    buckets: dict[int, list[Candidate]] = {}
    for c in candidates:
        buckets.setdefault(int(math.floor(c.mflops / bucket_mflops)), []).append(c)
    ranked = [sorted(b, key=lambda c: (-c.top1, c.mflops)) for _, b in sorted(buckets.items())]
    parents: list[Candidate] = []
    depth = 0
    while len(parents) < min(count, len(candidates)):
        for bucket in ranked:
            if depth < len(bucket) and len(parents) < count:
                parents.append(bucket[depth])
        depth += 1
    return parents


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """Non-dominated candidates: no other has at most the FLOPs and strictly more top-1 (or equal top-1, fewer FLOPs)."""
    front: list[Candidate] = []
    best = -math.inf
    for c in sorted(candidates, key=lambda c: (c.mflops, -c.top1)):
        if c.top1 > best:
            front.append(c)
            best = c.top1
    return front


def best_per_bucket(candidates: list[Candidate], bucket_mflops: float) -> list[Candidate]:
    best: dict[int, Candidate] = {}
    for c in candidates:
        b = int(math.floor(c.mflops / bucket_mflops))
        if b not in best or c.top1 > best[b].top1:
            best[b] = c
    return [best[b] for b in sorted(best)]
