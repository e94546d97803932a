"""Checkpoint faults: files that would run code, corrupt newest checkpoints, failed saves, a failing rank.

Each case asserts that nothing runs from a file, nothing incomplete is committed, the message names the
file, and a resume still works from what is left.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_helpers import child_env, free_port, overrides, run_in_process

from trainer.state.checkpoint import CheckpointError, committed_tags, latest_tag, rng_state, set_rng_state
from trainer.state.safe_checkpoint import CheckpointFileError, safe_load


class RunsCode:
    """Unpickling this calls ``os.system``: what a crafted checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_malicious(path: Path, marker: Path) -> None:
    torch.save({"module": {"w": torch.zeros(1)}, "payload": RunsCode(marker)}, path)


def test_a_file_that_would_run_code_is_refused(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    write_malicious(path, marker)
    with pytest.raises(CheckpointFileError, match="refused to load") as info:
        safe_load(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the same file, loaded the unsafe way, does run the command
    assert marker.exists()


def test_a_truncated_file_is_named(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.arange(1000.0)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointFileError, match="corrupt or truncated") as info:
        safe_load(path)
    assert str(path) in str(info.value)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.randn()  # a cached Gaussian is part of NumPy's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(safe_load(tmp_path / "rng.pt"))
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected


def test_consolidate_refuses_a_crafted_checkpoint(repo, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "ran"
    tag = run / "checkpoints" / "step000000002"
    tag.mkdir(parents=True)
    write_malicious(tag / "mp_rank_00_model_states.pt", marker)
    (run / "checkpoints" / "latest").write_text("step000000002")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "trainer.consolidate", str(run)], cwd=repo, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "refused to load" in done.stderr and "mp_rank_00_model_states.pt" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists()


# ---- in-process runs (one rank) ------------------------------------------------------------------------
@pytest.fixture()
def digits(digits_shards) -> Path:
    return digits_shards


def first_run(repo, digits, run: Path, steps: int = 4):
    """A run with committed checkpoints every 2 steps up to ``steps`` (the newest two retained)."""
    run_in_process(repo, overrides(run, digits, **{"optimizer.max_steps": steps}))
    assert committed_tags(run / "checkpoints") == [f"step{s:09d}" for s in range(steps, 0, -2)][:2]


@pytest.mark.parametrize("damage", ["malicious_trainer_state", "truncated_model_states"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous(repo, digits, tmp_path, single_rank, damage):
    run, marker = tmp_path / "run", tmp_path / "ran"
    first_run(repo, digits, run)
    newest = run / "checkpoints" / "step000000004"
    if damage == "malicious_trainer_state":
        bad = newest / "trainer_rank0.pt"
        write_malicious(bad, marker)
    else:
        bad = newest / "mp_rank_00_model_states.pt"
        bad.write_bytes(bad.read_bytes()[:1000])
    trainer, results = run_in_process(repo, overrides(run, digits, **{"optimizer.max_steps": 6}))
    assert trainer.resumed_from == "step000000002"
    assert any(str(bad) in line for line in trainer.resume_warnings), trainer.resume_warnings
    assert results["global_step"] == 6 and latest_tag(run / "checkpoints") == "step000000006"
    assert not marker.exists()


def test_no_readable_checkpoint_is_a_clear_error(repo, digits, tmp_path, single_rank):
    run = tmp_path / "run"
    first_run(repo, digits, run)
    for tag in committed_tags(run / "checkpoints"):
        (run / "checkpoints" / tag / "trainer_rank0.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no committed checkpoint can be read"):
        run_in_process(repo, overrides(run, digits, **{"optimizer.max_steps": 6}))


@pytest.mark.parametrize("which", ["trainer_rank0.pt", "mp_rank_00_model_states.pt"])
def test_a_failed_save_commits_nothing(repo, digits, tmp_path, single_rank, monkeypatch, which):
    run = tmp_path / "run"
    first_run(repo, digits, run, steps=2)
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step000000004" in str(f) and which.split(".")[0] in str(f):
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        run_in_process(repo, overrides(run, digits, **{"optimizer.max_steps": 6}))
    assert which.split(".")[0] in str(info.value) and "step000000002" in str(info.value)
    assert latest_tag(run / "checkpoints") == "step000000002"
    assert not (run / "checkpoints" / "step000000004").exists()  # the partial checkpoint is removed
    monkeypatch.setattr(torch, "save", save)
    trainer, results = run_in_process(repo, overrides(run, digits, **{"optimizer.max_steps": 6}))
    assert trainer.resumed_from == "step000000002" and results["global_step"] == 6


# ---- two real ranks through the deepspeed launcher -------------------------------------------------------
def launch_faulty(repo, fault: str, rank: int, step: int, args: list[str], log: Path) -> subprocess.Popen:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = child_env(drop=launcher, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    command += ["tests/workers/faulty_rank.py", fault, str(rank), str(step)]
    command += ["--config", "configs/tiny_cpu.yaml", "--set", *args]
    return subprocess.Popen(
        command, cwd=repo, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


@pytest.mark.slow
def test_a_rank_that_raises_ends_the_job_at_once(repo, digits, tmp_path):
    log = tmp_path / "job.log"
    proc = launch_faulty(repo, "raise", 1, 3, overrides(tmp_path / "run", digits), log)
    failed_at = None
    deadline = time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline:
            if failed_at is None and "injected failure" in log.read_text():
                failed_at = time.time()
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    ended_at, text = time.time(), log.read_text()
    assert proc.returncode not in (0, None), text[-3000:]
    assert "Traceback" in text and "RuntimeError: injected failure on rank 1 at step 3" in text
    assert ended_at - (failed_at or ended_at) < 60  # not gloo's timeout: the failing rank does not wait


@pytest.mark.slow
def test_a_rank_whose_disk_is_full_commits_nothing(repo, digits, tmp_path):
    run, log = tmp_path / "run", tmp_path / "job.log"
    args = overrides(run, digits, **{"optimizer.max_steps": 6})
    start = time.time()
    proc = launch_faulty(repo, "disk_full", 1, 4, args, log)
    rc = proc.wait(timeout=300)
    text = log.read_text()
    assert rc != 0 and time.time() - start < 300, text[-3000:]
    assert "was not committed" in text and "trainer_rank1.pt" in text, text[-3000:]
    assert latest_tag(run / "checkpoints") == "step000000002"
    assert not (run / "checkpoints" / "step000000004").exists()
    proc = launch_faulty(repo, "none", 0, 0, args, tmp_path / "resume.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert latest_tag(run / "checkpoints") == "step000000006"


@pytest.mark.slow
def test_sigterm_to_the_whole_process_tree_saves_and_resumes(repo, digits, tmp_path):
    """What SLURM does on preemption or scancel: SIGTERM to every process of the step, data workers too."""
    run, log = tmp_path / "run", tmp_path / "job.log"
    args = overrides(run, digits, **{"optimizer.max_steps": 40, "checkpoint.every_steps": 100})
    args += ["data.num_workers=2"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "trainer/run.py", "--config", "configs/tiny_cpu.yaml", "--set", *args]
    proc = subprocess.Popen(
        command, cwd=repo, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count('"loss/largest"') >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, log.read_text()[-3000:]
    children = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) >= 3  # the rank and its two data workers
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "signal received: saved" in text and "killed by signal" not in text, text[-3000:]
    saved = latest_tag(run / "checkpoints")
    assert saved is not None and 3 <= int(saved[4:]) < 40
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / saved}" in done.stdout
    assert latest_tag(run / "checkpoints") == "step000000040"


def step_losses(run: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss/")} for r in records if "loss/largest" in r}


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_checkpoint_write(repo, digits, tmp_path):
    """Nothing half-written is committed; the rerun resumes from the previous checkpoint and ends
    bit-identical to a run that was never interrupted."""
    from trainer.consolidate import consolidated_state_dict

    env = child_env(drop=("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"), DS_ACCELERATOR="cpu")

    def run(fault: str, run_dir: Path) -> subprocess.CompletedProcess:
        args = overrides(run_dir, digits, **{"optimizer.max_steps": 6})
        command = [sys.executable, "tests/workers/faulty_rank.py", fault, "0", "4", "--config", "configs/tiny_cpu.yaml"]
        return subprocess.run(
            [*command, "--set", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600
        )

    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    assert run("none", reference).returncode == 0
    killed = run("kill_in_save", interrupted)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert latest_tag(interrupted / "checkpoints") == "step000000002"
    assert (interrupted / "checkpoints" / "step000000004").is_dir()  # the half-written, uncommitted save
    resumed = run("none", interrupted)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step000000002" in resumed.stdout
    assert step_losses(interrupted) == step_losses(reference)
    assert not list((interrupted / "checkpoints").rglob(".*tmp-*"))  # no temporary file left anywhere
    expected = consolidated_state_dict(reference / "checkpoints", "step000000006")[0]
    got = consolidated_state_dict(interrupted / "checkpoints", "step000000006")[0]
    assert all(torch.equal(expected[k], got[k]) for k in expected)
