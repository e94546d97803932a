"""Evolutionary search: selection and front rules, a resumable search run, uneven splits over 2
processes, and export round trips (PyTorch and ONNX equal to the recalibrated supernet)."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from data_pipeline import prepare as prep
from models import ArchSampler, build_supernet, load_search_space, load_subnet
from models.flops import subnet_cost
from search.evolution import (
    Candidate,
    FlopsConstrainedSampler,
    SpaceExhausted,
    best_per_bucket,
    pareto_front,
    select_parents,
)
from trainer.config import load_config, write_resolved


def cand(mflops: float, top1: float) -> Candidate:
    space = load_search_space("tiny")
    return Candidate(space.smallest(), mflops, 0.0, top1, top1)


def test_pareto_front_is_the_non_dominated_set():
    rng = random.Random(0)
    pool = [cand(rng.uniform(0, 10), rng.uniform(0, 100)) for _ in range(200)]
    front = pareto_front(pool)
    brute = [
        c
        for c in pool
        if not any(
            (o.mflops <= c.mflops and o.top1 > c.top1) or (o.mflops < c.mflops and o.top1 >= c.top1) for o in pool
        )
    ]
    assert sorted((c.mflops, c.top1) for c in front) == sorted((c.mflops, c.top1) for c in brute)
    assert all(a.mflops < b.mflops and a.top1 < b.top1 for a, b in itertools.pairwise(front))


def test_parents_come_from_every_bucket_best_first():
    pool = [cand(1.5, 50), cand(1.2, 70), cand(2.5, 40), cand(2.1, 45), cand(3.3, 10), cand(1.9, 60)]
    parents = select_parents(pool, 4, bucket_mflops=1.0)
    assert [(p.mflops, p.top1) for p in parents] == [(1.2, 70), (2.1, 45), (3.3, 10), (1.9, 60)]
    assert [(c.mflops, c.top1) for c in best_per_bucket(pool, 1.0)] == [(1.2, 70), (2.1, 45), (3.3, 10)]


def test_constrained_sampler_respects_range_and_novelty():
    space = load_search_space("tiny")
    sampler = FlopsConstrainedSampler(space, ArchSampler(space, 0), 0.3, 0.8, num_classes=10)
    seen: set[str] = set()
    archs = [sampler.draw(sampler.sampler.random, seen) for _ in range(30)]
    assert all(0.3 <= sampler.mflops(a) <= 0.8 for a in archs)
    assert len({json.dumps(a.to_dict()) for a in archs}) == 30
    narrow = FlopsConstrainedSampler(space, ArchSampler(space, 0), 50.0, 60.0, num_classes=10, max_tries=50)
    with pytest.raises(SpaceExhausted, match=r"widen the range \(search.min_mflops, search.max_mflops\)"):
        narrow.draw(narrow.sampler.random, set())


class ScoreAll:
    """A candidate store that remembers nothing: every arch is scored."""

    def score(self, archs, evaluate, progress=None):
        return [evaluate(arch) for arch in archs]


class Said:
    """The search's console, keeping its lines (without progress)."""

    def __init__(self):
        self.lines: list[str] = []

    def say(self, text: str) -> None:
        self.lines.append(text)

    def progress(self, phase: str):
        return lambda *_: None


def by_width(space):
    def evaluate(arch, batches):
        cost = subnet_cost(space, arch, 10)
        return Candidate(arch, cost.mflops, cost.params_m, 100 * arch.width, 0.0)

    return evaluate


def test_a_slimmable_search_smaller_than_its_draws_evaluates_every_width():
    """Population 6 over 14 widths, with the default generations (256 children each): before, generation 1 ran
    out of new widths ("no new architecture ... after 10000 draws") although the range holds every width."""
    from search.config import SearchConfig
    from search.run import evolve

    space = load_search_space("tiny_slim_mbv2")
    assert len(space.widths) == 14
    said = Said()
    search = SearchConfig(population=6, min_mflops=0.1, max_mflops=1.0, bucket_mflops=0.05)
    population = evolve(search, space, 10, ScoreAll(), by_width(space), said)
    assert sorted(c.arch.width for c in population) == list(space.widths)
    assert said.lines == ["'tiny_slim_mbv2' holds 14 sub-networks, 14 within the FLOPs range: evaluating all of them"]
    # A search that draws fewer than the space holds still evolves: 6 + 1 × (2 + 2) of 14.
    small = SearchConfig(
        population=6, parents=3, crossovers=2, mutations=2, iterations=1, min_mflops=0.1, max_mflops=1.0
    )
    population = evolve(small, space, 10, ScoreAll(), by_width(space), said)
    assert len({c.arch.width for c in population}) == len(population) == 10
    with pytest.raises(SpaceExhausted, match="no sub-network of 'tiny_slim_mbv2' within"):
        evolve(SearchConfig(population=6, min_mflops=50, max_mflops=60), space, 10, ScoreAll(), by_width(space), Said())


# ---- a run folder with supernet weights, no training needed ----------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, repo) -> Path:
    root = tmp_path_factory.mktemp("search")
    data = root / "digits"
    prep.prepare("digits", data, ["webdataset"], quiet=True)
    config = load_config(
        repo / "configs/tiny_cpu.yaml", [f"run_dir={root / 'run'}", f"data.root={data}", "data.num_workers=0"]
    )
    write_resolved(config)
    torch.manual_seed(0)
    net = build_supernet(config.model)
    with torch.no_grad():  # nonzero BN gammas so that sub-networks differ from each other
        for name, p in net.named_parameters():
            if name.endswith("project_bn.weight"):
                p.normal_(0.5, 0.1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "run" / "supernet.safetensors"))
    search = {
        "search": {
            "min_mflops": 0.1,
            "max_mflops": 2.0,
            "population": 5,
            "parents": 3,
            "crossovers": 2,
            "mutations": 2,
            "iterations": 1,
            "calib_batches": 2,
            "marked_calib_batches": 3,
            "val_batches": 2,
            "batch_size": 50,
            "bucket_mflops": 0.2,
            "mark_models": str(repo / "configs/tiny_models.yaml"),
        }
    }
    (root / "search.yaml").write_text(yaml.safe_dump(search))
    return root


def search_cmd(run_dir: Path, *extra: str) -> list[str]:
    return ["search/run.py", "--config", str(run_dir / "search.yaml"), "--run-dir", str(run_dir / "run"), *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_search_writes_front_resumes_and_exports(run_dir, repo, monkeypatch, tmp_path, capfd):
    from search import run as search

    monkeypatch.chdir(repo)
    out = run_dir / "run" / "search"
    assert search.main(search_cmd(run_dir, "--export", "tiny_m", "pareto@0.6")[1:]) == 0
    printed = capfd.readouterr().out
    # progress from the first candidate on, timestamped, before the generation's summary
    first = re.search(r"^\d\d:\d\d:\d\d generation 0: 1/5 scored, [\d.]+ s each", printed, re.M)
    assert first is not None and first.start() < printed.index("generation 0: 5 candidates"), printed
    assert re.search(r"^\d\d:\d\d:\d\d \d+ calibration and \d+ validation batches", printed, re.M)
    records = read_jsonl(out / "candidates.jsonl")
    assert len(records) == 5 + 4 + 3  # population + children + the 3 marked models
    front = json.loads((out / "front.json").read_text())
    assert front["candidates"] == 9 and set(front["marked"]) == {"tiny_s", "tiny_m", "tiny_l"}
    assert (out / "front.png").stat().st_size > 10_000
    assert all(0.1 <= r["mflops"] <= 2.0 for r in records[:9])

    # A rerun continues from candidates.jsonl: nothing is evaluated again ...
    calls = {"n": 0}
    real_call = search.CandidateEvaluator.__call__

    def counting(self, arch, batches):
        calls["n"] += 1
        return real_call(self, arch, batches)

    monkeypatch.setattr(search.CandidateEvaluator, "__call__", counting)
    assert search.main(search_cmd(run_dir)[1:]) == 0
    assert calls["n"] == 0 and len(read_jsonl(out / "candidates.jsonl")) == 12
    # ... and after a kill mid-generation (results of the generation only in a rank's partial file, the
    # last line cut), only the missing candidates are evaluated.
    lines = (out / "candidates.jsonl").read_text().splitlines()
    (out / "candidates.jsonl").write_text("\n".join(lines[:4]) + "\n")
    (out / "candidates.rank1.partial.jsonl").write_text("\n".join(lines[4:6]) + "\n" + lines[6][: len(lines[6]) // 2])
    assert search.main(search_cmd(run_dir)[1:]) == 0
    assert calls["n"] == 6
    assert not list(out.glob("*.partial.jsonl"))
    again = read_jsonl(out / "candidates.jsonl")
    key = lambda r: json.dumps(r["arch"], sort_keys=True)  # noqa: E731
    assert {key(r): r["top1"] for r in again} == {key(r): r["top1"] for r in records}

    # Exports reload without the supernet; PyTorch and ONNX agree with the recalibrated supernet.
    # The marked model was recalibrated on marked_calib_batches (3), a candidate on calib_batches (2).
    for name, calib_batches in (("tiny_m", 3), ("pareto_0.6mflops", 2)):
        folder = out / "exports" / name
        assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "arch.yaml", "model.onnx"}
        check_against_supernet(run_dir, folder, calib_batches)
        # A deployer's preprocessing, from the run's data section: the exported resolution, mean and std.
        resolution = load_subnet(folder).arch.resolution
        data = load_config(run_dir / "run" / "config.yaml").data
        preprocessing = yaml.safe_load((folder / "arch.yaml").read_text())["preprocessing"]
        assert preprocessing["input_size"] == [3, resolution, resolution] and preprocessing["resize_to"] == resolution
        assert preprocessing["mean"] == list(data.mean) and preprocessing["std"] == list(data.std)
        assert preprocessing["center_crop"] == data.base_resolution

    # The README's reload snippet, as a user pastes it, from a folder outside the checkout.
    readme = (repo / "README.md").read_text()
    snippet = re.search(r"<!-- reload-snippet -->\n```python\n(.*?)```", readme, re.S).group(1)
    folder_line = re.search(r'^folder = ".*$', snippet, re.M).group(0)
    snippet = snippet.replace(folder_line, f"folder = {str(out / 'exports' / 'tiny_m')!r}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ran = subprocess.run([sys.executable, "-c", snippet], cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert re.fullmatch(r"tensor\(\[\d+, \d+\]\)\n", ran.stdout)


def check_against_supernet(run_dir: Path, folder: Path, calib_batches: int) -> None:
    """The model exported to ``folder`` (reloaded without the supernet, and its ONNX graph) equals the
    supernet's output for its arch after the same BN recalibration."""
    import numpy as np
    import onnxruntime
    from safetensors.torch import load_file

    from data_pipeline import build_loader, normalize
    from data_pipeline.device_transforms import rescale
    from models.ops import DynamicBatchNorm2d

    model = load_subnet(folder)
    config = load_config(run_dir / "run" / "config.yaml")
    net = build_supernet(config.model)
    net.load_state_dict(load_file(str(run_dir / "run" / "supernet.safetensors")))
    net.set_arch(model.arch)
    from dataclasses import replace

    data = replace(config.data, batch_size=50)
    calib = []
    for batch in build_loader(data, "train", train=True, seed=1):  # what the search used (seed + 1)
        calib.append(rescale(normalize(batch.images, data.mean, data.std), model.arch.resolution))
        if len(calib) == calib_batches:
            break
    bns = [m for m in net.modules() if isinstance(m, DynamicBatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    net.train()
    with torch.no_grad():
        for x in calib:
            net(x)
    net.eval()
    x = torch.randn(3, 3, model.arch.resolution, model.arch.resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(x)
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], expected.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_uneven_split_over_two_processes(run_dir, repo, tmp_path):
    """5 + 4 candidates over 2 ranks (3/2 then 2/2 shares): no deadlock, same scores as one process."""
    out = run_dir / "run" / "search_two"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29731",
        *search_cmd(run_dir, "--set", "search.output=search_two", "search.mark_models=null"),
    ]
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    two = {json.dumps(r["arch"], sort_keys=True): r["top1"] for r in read_jsonl(out / "candidates.jsonl")}
    assert len(two) == 9
    single = subprocess.run(
        [sys.executable, *search_cmd(run_dir, "--set", "search.output=search_one", "search.mark_models=null")],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    one = {
        json.dumps(r["arch"], sort_keys=True): r["top1"]
        for r in read_jsonl(run_dir / "run" / "search_one" / "candidates.jsonl")
    }
    assert one == two


def test_search_config_errors_exit_2(run_dir, repo):
    result = subprocess.run(
        [sys.executable, *search_cmd(run_dir, "--set", "search.populaton=3")], cwd=repo, capture_output=True, text=True
    )
    assert result.returncode == 2 and "search.populaton" in result.stderr


def test_a_search_whose_range_runs_out_of_new_archs_exits_2_in_one_line(run_dir, repo):
    result = subprocess.run(
        [sys.executable, *search_cmd(run_dir, "--set", "search.min_mflops=0.1", "search.max_mflops=0.11")],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "no new architecture within [0.1, 0.11] MFLOPs" in line and "search.population" in line
