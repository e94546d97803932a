"""Search space, ArchConfig validation, seeded sampling with saved state, mutation and crossover."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from models import ArchConfig, ArchSampler, load_named_archs


def test_alphanet_space_matches_design_table(alphanet_space):
    space = alphanet_space
    assert space.total_stride == 32
    assert [s.name for s in space.stages] == [f"mb{i}" for i in range(1, 8)]
    assert space.stages[4].widths == (112, 120, 128)
    assert space.stages[5].depths == (3, 4, 5, 6, 7, 8)
    assert [s.se for s in space.stages] == [False, False, True, False, True, True, True]
    assert [s.stride for s in space.stages] == [1, 2, 2, 2, 1, 2, 1]
    largest, smallest = space.largest(), space.smallest()
    assert largest.resolution == 288 and smallest.resolution == 192
    assert largest.widths == (24, 24, 32, 40, 72, 128, 216, 224, 1984)
    assert smallest.depths == (1, 3, 3, 3, 3, 3, 1)
    assert largest.expands == (1, 6, 6, 6, 6, 6, 6)


def test_published_models_are_in_the_space(repo):
    space, archs = load_named_archs(repo / "configs/alphanet_models.yaml")
    assert sorted(archs) == sorted([f"a{i}" for i in range(7)] + ["a5_1"])  # a5_1: the reference code's larger A5
    assert archs["a6"].depths == (1, 3, 3, 4, 4, 6, 1)
    for arch in archs.values():
        assert arch.problems(space) == []


def test_arch_problems_list_every_violation(alphanet_space):
    arch = alphanet_space.largest().with_genes({"resolution": 100, "widths.3": 33, "kernels.0": 7})
    problems = arch.problems(alphanet_space)
    assert len(problems) == 3
    with pytest.raises(ValueError, match="resolution 100"):
        arch.validate(alphanet_space)
    with pytest.raises(ValueError, match="inconsistent lengths"):
        ArchConfig(resolution=32, widths=(8,), depths=(1,), kernels=(3,), expands=(1,))


def test_arch_round_trips_through_json(alphanet_space):
    arch = ArchSampler(alphanet_space, seed=3).random()
    assert ArchConfig.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch


def test_sampler_is_deterministic_and_resumable(alphanet_space):
    a, b = ArchSampler(alphanet_space, seed=11), ArchSampler(alphanet_space, seed=11)
    first = [a.random() for _ in range(5)]
    assert first == [b.random() for _ in range(5)]
    state = json.loads(json.dumps(a.state_dict()))  # the state survives serialisation
    expected = [a.random() for _ in range(5)]
    c = ArchSampler(alphanet_space, seed=999)
    c.load_state_dict(state)
    assert [c.random() for _ in range(5)] == expected
    assert (
        ArchSampler(alphanet_space, seed=12).random() != first[0]
        or ArchSampler(alphanet_space, seed=12).random() != first[1]
    )


def test_random_sampling_is_uniform_over_each_gene(tiny_space):
    sampler = ArchSampler(tiny_space, seed=0)
    counts: dict[str, defaultdict] = {gene: defaultdict(int) for gene, _ in tiny_space.choices()}
    n = 3000
    for _ in range(n):
        arch = sampler.random()
        assert arch.problems(tiny_space) == []
        for gene in counts:
            counts[gene][arch.get_gene(gene)] += 1
    for gene, choices in tiny_space.choices():
        assert set(counts[gene]) == set(choices), gene
        for value in choices:  # within 5 standard deviations of n / k
            expected = n / len(choices)
            sd = (n * (1 / len(choices)) * (1 - 1 / len(choices))) ** 0.5
            assert abs(counts[gene][value] - expected) <= 5 * sd + 1e-9, (gene, value)


def test_mutation_and_crossover(alphanet_space):
    sampler = ArchSampler(alphanet_space, seed=5)
    parent = sampler.random()
    assert sampler.mutate(parent, 0.0) == parent
    changed = [sampler.mutate(parent, 1.0) for _ in range(20)]
    assert all(c.problems(alphanet_space) == [] for c in changed)
    # At probability 1 every gene with more than one choice changes (a mutation never redraws the same value).
    for child in changed:
        for gene, choices in alphanet_space.choices():
            assert (child.get_gene(gene) != parent.get_gene(gene)) == (len(choices) > 1), gene
    a, b = alphanet_space.smallest(), alphanet_space.largest()
    child = sampler.crossover(a, b)
    genes = [g for g, _ in alphanet_space.choices()]
    assert all(child.get_gene(g) in (a.get_gene(g), b.get_gene(g)) for g in genes)
    mix = [sampler.crossover(a, b) for _ in range(20)]
    from_b = sum(c.get_gene(g) == b.get_gene(g) != a.get_gene(g) for c in mix for g in genes)
    differing = sum(a.get_gene(g) != b.get_gene(g) for g in genes) * len(mix)
    assert 0.35 < from_b / differing < 0.65


def test_every_space_file_and_arch_is_read_by_its_family():
    """Files keep their formats: a ``family`` key marks a slimmable space, a ``width`` key a width arch, and the
    MBConv family (no marker) reads the rest; every caller reaches the family through the space."""
    from models import SearchSpace, SlimmableSpace, load_search_space
    from models.families import FAMILIES, arch_from_dict, builtin_search_spaces, family_of, space_from_dict

    assert FAMILIES.names() == ["mbconv", "slimmable"]
    for name in builtin_search_spaces():
        space = load_search_space(name)
        family = family_of(space)
        assert family.name == ("slimmable" if "family" in space.to_dict() else "mbconv")
        assert space_from_dict(space.to_dict()) == space
        for arch in (space.largest(), space.smallest()):
            assert arch_from_dict(arch.to_dict()) == arch == family.arch_from_dict(arch.to_dict())
    assert (
        type(load_search_space("tiny")) is SearchSpace and type(load_search_space("tiny_slim_mbv1")) is SlimmableSpace
    )
    assert family_of(load_search_space("tiny")).supports_local_sharing
    assert not family_of(load_search_space("tiny_slim_mbv2")).supports_local_sharing
