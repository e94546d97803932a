"""Local weight sharing (Distribution Consistent NAS, Pan et al., CVPR 2023): the model side.

Under ``model.sharing: local`` every MBConv block of the supernet (a *layer*) holds M candidate copies of
its weights, BatchNorm included.  A sub-network runs, in each layer, the candidate its *assignment* names.
Assignments are learnt layer by layer during training (``trainer.sharing.local``) for a fixed set of N
sampled architectures; any other architecture takes, per layer, the assignment of its nearest sampled
architecture that runs the same operator there (see :meth:`LocalAssignment.candidate`).

Our space slices one weight tensor per layer for every kernel size, expansion and width (global sharing
across operator choices); the paper's operator ``C_{l,k}`` is here the layer's (kernel, expansion) pair.
Its M candidates are copies of the whole layer, so two operators of one layer still slice the same
candidate tensors; what the assignment decides is which candidate each architecture uses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.mbconv.search_space import ArchConfig, SearchSpace
from models.mbconv.subnet_plan import supernet_block_indices
from models.sampler import ArchSampler

Operator = tuple[int, int]
"""(kernel, expansion) of a layer."""


def block_positions(space: SearchSpace) -> list[tuple[int, int]]:
    """(stage, index in stage) of every supernet block."""
    return [(s, i) for s, indices in enumerate(supernet_block_indices(space)) for i in range(len(indices))]


def operator_at(space: SearchSpace, arch: ArchConfig, block: int) -> Operator | None:
    """The (kernel, expansion) ``arch`` runs in supernet block ``block``, None when its depth skips it."""
    stage, index = block_positions(space)[block]
    if index >= arch.depths[stage]:
        return None
    return arch.kernels[stage], arch.expands[stage]


def stage_operators(space: SearchSpace, block: int) -> list[Operator]:
    """Every operator a layer can run."""
    stage = space.stages[block_positions(space)[block][0]]
    return [(k, e) for k in stage.kernels for e in stage.expands]


def force_operator(space: SearchSpace, arch: ArchConfig, block: int, op: Operator) -> ArchConfig:
    """``arch`` changed as little as possible to run ``op`` in ``block`` (deep enough, that kernel and expansion)."""
    stage, index = block_positions(space)[block]
    depth = max(arch.depths[stage], min(d for d in space.stages[stage].depths if d > index))
    return arch.with_genes({f"depths.{stage}": depth, f"kernels.{stage}": op[0], f"expands.{stage}": op[1]})


def gene_vector(space: SearchSpace, arch: ArchConfig) -> np.ndarray:
    """Each gene's position among its choices, scaled to [0, 1] (the distance used to find representatives)."""
    values = []
    for gene, choices in space.choices():
        values.append(choices.index(arch.get_gene(gene)) / (len(choices) - 1) if len(choices) > 1 else 0.0)
    return np.asarray(values, dtype=np.float64)


class LocalAssignment:
    """The N sampled architectures and, per decided layer, the candidate each of them uses."""

    def __init__(self, space: SearchSpace, archs: list[ArchConfig], num_candidates: int):
        self.space = space
        self.archs = list(archs)
        self.num_candidates = num_candidates
        self.num_blocks = len(block_positions(space))
        self.decided: dict[int, list[int | None]] = {}
        """Supernet block → the candidate of every sampled arch (None where the arch skips the block)."""
        self._vectors = np.stack([gene_vector(space, a) for a in self.archs])
        self._index = {a: i for i, a in enumerate(self.archs)}
        self._members: list[dict[Operator, np.ndarray]] = []  # per block: operator → sampled archs running it
        self._running: list[np.ndarray] = []  # per block: sampled archs running it at all
        positions = block_positions(space)
        for stage, index in positions:
            by_op: dict[Operator, list[int]] = {}
            for i, a in enumerate(self.archs):
                if index < a.depths[stage]:
                    by_op.setdefault((a.kernels[stage], a.expands[stage]), []).append(i)
            self._members.append({op: np.asarray(members) for op, members in by_op.items()})
            self._running.append(np.asarray(sorted(i for members in by_op.values() for i in members), dtype=np.int64))

    @classmethod
    def sample(cls, space: SearchSpace, count: int, num_candidates: int, seed: int) -> LocalAssignment:
        """``count`` distinct architectures drawn uniformly (fewer when the space is smaller), the smallest and
        the largest among them."""
        sampler = ArchSampler(space, seed)
        archs = [space.smallest(), space.largest()]
        seen = set(archs)
        for _ in range(count * 20):
            if len(archs) >= count:
                break
            arch = sampler.random()
            if arch not in seen:
                seen.add(arch)
                archs.append(arch)
        return cls(space, archs[:count], num_candidates)

    def members(self, block: int, op: Operator) -> list[int]:
        """Indices of the sampled archs that run ``op`` in ``block``."""
        return [int(i) for i in self._members[block].get(op, [])]

    def distances(self, arch: ArchConfig) -> np.ndarray:
        """L1 distance over :func:`gene_vector` from ``arch`` to every sampled arch."""
        return np.abs(self._vectors - gene_vector(self.space, arch)).sum(axis=1)

    def nearest(self, arch: ArchConfig, block: int, distances: np.ndarray | None = None) -> int | None:
        """The sampled arch that represents ``arch`` in ``block``: ``arch`` itself when sampled, else the nearest
        (L1 over :func:`gene_vector`, lowest index on ties) among those running the same operator there, else
        among those running the block at all; None when ``arch`` skips the block."""
        op = operator_at(self.space, arch, block)
        if op is None:
            return None
        if arch in self._index:
            return self._index[arch]
        pool = self._members[block].get(op)
        pool = self._running[block] if pool is None else pool
        if not len(pool):
            return None
        distances = self.distances(arch) if distances is None else distances
        return int(pool[int(np.argmin(distances[pool]))])  # the first minimum: the lowest index (pools are sorted)

    def candidate(self, arch: ArchConfig, block: int, distances: np.ndarray | None = None) -> int | None:
        """The decided candidate of ``arch`` in ``block``; None when the block is undecided or skipped."""
        if block not in self.decided:
            return None
        representative = self.nearest(arch, block, distances)
        return None if representative is None else self.decided[block][representative]

    def candidates(self, arch: ArchConfig, undecided: int | list[int] = 0) -> tuple[int, ...]:
        """The candidate of every supernet block for ``arch``: decided ones from the assignment, the others
        ``undecided`` (one value, or one per block)."""
        # a sampled arch is its own representative: the distances are needed only for the others
        out, distances = [], self.distances(arch) if self.decided and arch not in self._index else None
        for block in range(self.num_blocks):
            chosen = self.candidate(arch, block, distances)
            fallback = undecided if isinstance(undecided, int) else undecided[block]
            out.append(fallback if chosen is None else chosen)
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_candidates": self.num_candidates,
            "archs": [a.to_dict() for a in self.archs],
            "decided": {str(block): values for block, values in sorted(self.decided.items())},
        }

    @classmethod
    def from_dict(cls, space: SearchSpace, data: dict[str, Any]) -> LocalAssignment:
        assignment = cls(space, [ArchConfig.from_dict(a) for a in data["archs"]], int(data["num_candidates"]))
        for block, values in data["decided"].items():
            if len(values) != len(assignment.archs):
                raise ValueError(f"layer {block}: {len(values)} assignments for {len(assignment.archs)} archs")
            bad = [v for v in values if v is not None and not 0 <= int(v) < assignment.num_candidates]
            if bad or not 0 <= int(block) < assignment.num_blocks:
                raise ValueError(f"layer {block}: assignment outside the supernet's candidates or layers")
            assignment.decided[int(block)] = [None if v is None else int(v) for v in values]
        return assignment
