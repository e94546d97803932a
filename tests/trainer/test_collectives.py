"""Every all-reduce goes through ``trainer.runtime.collectives.all_reduce_``, which moves a tensor the backend cannot
take (a CPU tensor under NCCL) to a device it can: the first GPU run stopped at its first optimizer step
without it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from trainer_helpers import child_env

from trainer.runtime.collectives import all_reduce_, collective_device

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("trainer", "search", "models", "losses", "data_pipeline", "bench")


def test_no_module_all_reduces_around_the_helper():
    raw = re.compile(r"\bdist\.all_reduce\(|\btorch\.distributed\.all_reduce\(")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != ROOT / "trainer" / "runtime" / "collectives.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if raw.search(line)
    ]
    assert offenders == []


def test_without_a_process_group_the_tensor_is_returned_unchanged(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # an in-process run before may have left one
    values = torch.tensor([1.0, 2.0])
    assert all_reduce_(values) is values
    assert values.tolist() == [1.0, 2.0]


@pytest.fixture
def one_rank_gloo_group(tmp_path):
    """A one-rank gloo group: the default group an in-process training run earlier in the session left (the
    trainer's, also one gloo rank), or a new one."""
    if dist.is_initialized():
        assert dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_one_rank_group_reduces_in_place(one_rank_gloo_group):
    values = torch.tensor([3.0, -1.0])
    assert all_reduce_(values, dist.ReduceOp.MAX) is values
    assert values.tolist() == [3.0, -1.0]
    assert collective_device(values) == values.device  # gloo takes CPU tensors where they are


def test_under_nccl_a_cpu_tensor_is_reduced_on_the_current_gpu(monkeypatch, one_rank_gloo_group):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device(torch.zeros(1)) == torch.device("cuda", 3)


def test_the_gpu_bench_runs_its_engines_on_the_cpu(tmp_path):
    """``bench.gpu_step --cpu``: the script the GPU runs, end to end on the tiny space, through the same
    all-reduce path (the plain loop's gradients and DeepSpeed's optimizer step)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "bench.gpu_step", "--cpu", "--space", "tiny", "--batch", "2"]
    command += ["--steps", "1", "--only", "plain PyTorch", "DeepSpeed ZeRO-1"]
    env = child_env(drop=("RANK", "WORLD_SIZE", "MASTER_PORT"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout[done.stdout.index("batch 2 on one CPU process:") :].splitlines()[2:4]
    assert [row[:30].strip() for row in table] == ["plain PyTorch", "DeepSpeed ZeRO-1"]
    for row in table:
        first_ms, ms, img_s = (float(x) for x in row[30:].split()[:3])
        assert first_ms > 0 and ms > 0 and abs(img_s - 2000 / ms) <= 0.5 + 0.01 * img_s


def test_the_paired_step_bench_runs_engines_side_by_side(tmp_path):
    """``bench.step_throughput --paired``: the named engines (the trainer's ZeRO-2, stepping as the trainer
    does, beside the plain loop) on the same 2-rank steps; each row's samples/s agrees with its ms per step and
    the ratio is the first engine's time over its own."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "bench.step_throughput", "--space", "tiny", "--batch", "2"]
    command += ["--steps", "1", "--paired", "plain PyTorch", "DeepSpeed ZeRO-2", "plain PyTorch, pinned"]
    env = child_env(drop=("RANK", "WORLD_SIZE", "MASTER_PORT"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("engine"))) + 1 :][:3]
    assert [row[:27].strip() for row in table] == ["plain PyTorch", "DeepSpeed ZeRO-2", "plain PyTorch, pinned"]
    (base_ms, base_rate, _, _, one), (ms, rate, kernel_ms, faults, ratio), pinned = (
        [float(x) for x in row[27:].split()] for row in table
    )
    assert pinned[0] > 0 and abs(pinned[-1] - base_ms / pinned[0]) <= pinned[-1] * (1 / base_ms + 1 / pinned[0]) + 0.001
    assert one == 1.0 and ms > 0  # ms are printed rounded to a millisecond: the tolerances allow for it
    assert 0 <= kernel_ms <= ms and faults >= 0
    assert "allocator: kept" in done.stdout  # the trainer's setting, the default
    assert abs(ratio - base_ms / ms) <= ratio * (0.5 / base_ms + 0.5 / ms) + 0.001
    for row_ms, row_rate in ((base_ms, base_rate), (ms, rate)):
        assert abs(row_rate - 2 * 2 / (row_ms / 1e3)) <= row_rate * 0.5 / row_ms + 0.01


def test_the_host_allocator_bench_runs_both_allocators(tmp_path):
    """``bench.host_allocator``: glibc's defaults, then the trainer's kept memory, each in its own 2-rank run;
    each row has its peak RSS at every mark, and the printed ratio is the two rows' times."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "bench.host_allocator", "--space", "tiny", "--batch", "2"]
    command += ["--steps", "3"]
    env = child_env(drop=("RANK", "WORLD_SIZE", "MASTER_PORT"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "peak RSS of rank 0 after steps 1, 2, 3" in lines[0]
    rows = [line.split() for line in lines[2:4]]
    assert [row[0] for row in rows] == ["glibc-default", "kept"]
    (default_ms, _, _, *default_peaks), (kept_ms, _, _, *kept_peaks) = ([float(x) for x in row[1:]] for row in rows)
    assert len(default_peaks) == len(kept_peaks) == 3 and all(p > 0 for p in default_peaks + kept_peaks)
    assert default_peaks == sorted(default_peaks) and kept_peaks == sorted(kept_peaks)  # high-water marks
    ratio = float(lines[4].split()[-1])
    assert abs(ratio - kept_ms / default_ms) <= ratio * (0.5 / kept_ms + 0.5 / default_ms) + 0.001
