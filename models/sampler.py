"""Seeded sampling, mutation and crossover of sub-networks, for a space of any family.

A space lists its genes and their choices (``space.choices()``); an arch reads and replaces them by name
(``get_gene``, ``with_genes``).  Nothing else of the family is needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.families import Arch, Space


class ArchSampler:
    """Seeded source of random sub-networks, mutations and crossovers.

    All ranks construct it with the same seed and call it in the same order, so every rank draws the
    same architecture at every step; its state is saved in checkpoints for an exact resume.
    """

    def __init__(self, space: Space, seed: int) -> None:
        self.space = space
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def _pick(self, choices: tuple):
        return choices[int(self._rng.integers(len(choices)))]

    def index(self, n: int) -> int:
        """A uniform integer in [0, n) from the same seeded stream (e.g. to pick parents)."""
        return int(self._rng.integers(n))

    def random(self) -> Arch:
        """Each gene drawn uniformly and independently from its choices."""
        genes = {gene: self._pick(choices) for gene, choices in self.space.choices()}  # one draw per gene
        return self.space.largest().with_genes(genes)

    def mutate(self, arch: Arch, prob: float) -> Arch:
        """Each gene mutates with probability ``prob`` to a value drawn uniformly from its *other* choices (the
        reference's rule: a mutation always changes the gene; a gene with one choice stays)."""
        genes = {}
        for gene, choices in self.space.choices():
            if self._rng.random() < prob:
                others = tuple(c for c in choices if c != arch.get_gene(gene))
                if others:
                    genes[gene] = self._pick(others)
        return arch.with_genes(genes)

    def crossover(self, a: Arch, b: Arch) -> Arch:
        """Uniform crossover: each gene from ``a`` or ``b`` with probability 1/2."""
        genes = {}
        for gene, _ in self.space.choices():
            genes[gene] = a.get_gene(gene) if self._rng.random() < 0.5 else b.get_gene(gene)
        return a.with_genes(genes)

    def state_dict(self) -> dict[str, Any]:
        return {"bit_generator": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["bit_generator"]
