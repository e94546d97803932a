"""The step bench's levers that the trainer does not use: thread placement (``plain PyTorch, pinned``) and
``torch.compile`` (``bench.compile_levers``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from trainer_helpers import child_env

from bench.step_throughput import pinned_to_own_core

needs_affinity = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")


@needs_affinity
@pytest.mark.parametrize("local_rank", [0, 1, 5])
def test_pinning_holds_the_thread_on_the_core_of_its_local_rank_and_restores_it(monkeypatch, local_rank):
    before = os.sched_getaffinity(0)
    cores = sorted(before)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    with pinned_to_own_core(True):
        assert os.sched_getaffinity(0) == {cores[local_rank % len(cores)]}
    assert os.sched_getaffinity(0) == before
    with pinned_to_own_core(False):
        assert os.sched_getaffinity(0) == before


@needs_affinity
def test_pinning_restores_the_affinity_when_the_step_fails(monkeypatch):
    before = os.sched_getaffinity(0)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(RuntimeError), pinned_to_own_core(True):
        raise RuntimeError("a failing step")
    assert os.sched_getaffinity(0) == before


def _rows(stdout: str, header: str) -> list[str]:
    """The lines of the table under the line that starts with ``header``, up to the first blank line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 1
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append(line)
    return rows


@pytest.mark.slow
def test_the_compile_bench_times_fused_batchnorm_silu_and_a_compiled_subnet(tmp_path):
    """``bench.compile_levers`` on the tiny space: one BatchNorm + SiLU shape of the largest sub-network (its
    batch and channels) and the smallest sub-network compiled; every ratio is the row's eager over compiled time."""
    command = [sys.executable, "-m", "bench.compile_levers", "--space", "tiny", "--batch", "2"]
    command += ["--subnets", "smallest", "--max-shapes", "2", "--reps", "1"]
    env = child_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    fused = _rows(done.stdout, "input (N, C, H, W)")
    assert len(fused) == 3 and fused[-1].startswith("all shapes")
    for row in fused[:2]:
        shape = tuple(int(v) for v in row[: row.index(")")].strip("( ").split(","))
        assert shape[0] == 2 and len(shape) == 4
        eager_ms, compiled_ms, compile_s, ratio = (float(v) for v in row[row.index(")") + 1 :].split())
        assert eager_ms > 0 and compiled_ms > 0 and compile_s > 0
        assert abs(ratio - eager_ms / compiled_ms) <= ratio * (0.005 / eager_ms + 0.005 / compiled_ms) + 0.005
    (subnet,) = _rows(done.stdout, "sub-network")
    name, resolution, eager_ms, compiled_ms, compile_s, ratio = subnet.split()
    assert name == "smallest" and int(resolution) > 0 and float(compile_s) > 0
    assert abs(float(ratio) - float(eager_ms) / float(compiled_ms)) <= 0.01 * float(ratio) + 0.005
