"""Ctrl-C saves: to the whole process group of a two-rank ``deepspeed`` run (a terminal's Ctrl-C), and to the
``deepspeed`` command alone (its ranks notice that their launcher is gone); a config error of a two-rank run is
printed once; the launcher watch itself."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from trainer_helpers import final_weights, launch, losses_by_step, overrides

from trainer.runtime.launcher_watch import launcher_name
from trainer.state.checkpoint import latest_tag

RUNNER_TRACEBACK = "deepspeed/launcher/runner.py"
"""DeepSpeed's runner (the ``deepspeed`` command) dies of the KeyboardInterrupt with its own traceback: its code."""


def group_members(pgid: int) -> list[str]:
    """``ps`` lines (pid, state, command) of the live processes of a process group."""
    out = subprocess.run(["ps", "-e", "-o", "pgid=,pid=,stat=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 3) for line in out.splitlines()]
    return [" ".join(row[1:]) for row in rows if len(row) == 4 and row[0] == str(pgid) and not row[2].startswith("Z")]


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count('"loss/largest"') >= step:
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {timeout} s: " + log.read_text()[-3000:])


def wait_until_gone(pgid: int, timeout: float) -> list[str]:
    """Wait for every process of the group to end; the ``ps`` lines of those left after ``timeout`` (then killed)."""
    deadline = time.time() + timeout
    while (left := group_members(pgid)) and time.time() < deadline:
        time.sleep(0.5)
    if left:
        os.killpg(pgid, signal.SIGKILL)
    return left


@contextlib.contextmanager
def group_killed_at_exit(proc: subprocess.Popen):
    """Whatever the test asserts inside, no process of the launcher's group outlives it."""
    try:
        yield
    finally:
        if proc.poll() is None or group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def interrupt(proc: subprocess.Popen, *, whole_group: bool) -> list[str]:
    """SIGINT to the launcher's process group (a terminal's Ctrl-C) or to the ``deepspeed`` runner alone; the runner
    dies of it at once (130 in a shell); the ``ps`` lines of what is left of the group after 120 s."""
    if whole_group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == -signal.SIGINT
    return wait_until_gone(proc.pid, timeout=120)


def console_checks(text: str) -> None:
    """What a rank must not print: tracebacks (the runner's own aside) and the CPU-only notices."""
    assert text.count("Traceback") == text.count(RUNNER_TRACEBACK), text[-3000:]
    assert "No CUDA runtime is found" not in text and "built successfully" not in text, text[-3000:]


# ---- the launcher watch ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, name",
    [
        (
            ["/v/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "run.py"],
            "deepspeed.launcher.launch",
        ),
        (["/v/bin/python", "/v/bin/deepspeed", "--num_gpus", "2", "trainer/run.py"], "deepspeed"),
        (["/v/bin/python", "/v/bin/torchrun", "--nproc_per_node", "2", "trainer/run.py"], "torchrun"),
        (["/v/bin/python", "-m", "torch.distributed.run", "trainer/run.py"], "torch.distributed.run"),
        (["/v/bin/python", "trainer/run.py", "--config", "deepspeed"], None),
        (["/usr/bin/bash", "-c", "deepspeed trainer/run.py"], None),
        (["/usr/sbin/slurmstepd"], None),
        ([], None),
    ],
)
def test_launcher_names(argv, name):
    assert launcher_name(argv) == name


WATCHER = textwrap.dedent(
    """
    import os, sys, threading
    from trainer.runtime.launcher_watch import Launcher, LauncherWatch
    gone = threading.Event()
    watch = LauncherWatch([Launcher(os.getppid(), "parent")], lambda launcher: gone.set())
    print("watching", flush=True)
    print("gone" if gone.wait(60) else "not noticed", flush=True)
    watch.close()
    """
)


def test_the_watch_notices_its_launcher_exit(repo, tmp_path):
    """A stand-in launcher (a Python process that starts the watching one) is killed: the watch calls back."""
    out = tmp_path / "watcher.out"
    parent_code = (
        f"import subprocess, sys; subprocess.run([sys.executable, '-c', {WATCHER!r}], stdout=open({str(out)!r}, 'w'))"
    )
    env = {**os.environ, "PYTHONPATH": str(repo)}
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=env)
    deadline = time.time() + 60
    while not (out.is_file() and "watching" in out.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    assert "watching" in out.read_text()
    parent.kill()
    parent.wait()
    while "\n" not in out.read_text().partition("watching\n")[2] and time.time() < deadline:
        time.sleep(0.05)
    assert out.read_text().splitlines() == ["watching", "gone"]


def test_a_launcher_already_gone_is_reported_and_a_closed_watch_calls_nothing():
    from trainer.runtime.launcher_watch import Launcher, LauncherWatch

    called = []
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # The child is no parent of this process: the pid check says it is not the launcher above it, so the watch
        # reports it as gone at once.
        LauncherWatch([Launcher(child.pid, "not above")], called.append).close()
        assert [launcher.pid for launcher in called] == [child.pid]
    finally:
        child.kill()
        child.wait()
    called.clear()
    watch = LauncherWatch([Launcher(os.getppid(), "parent")], called.append)
    watch.close()
    watch.close()  # twice is harmless
    assert called == []


# ---- two ranks through the deepspeed launcher ------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_to_the_process_group_saves_and_the_rerun_resumes_exactly(repo, digits_shards, tmp_path):
    """A terminal's Ctrl-C: SIGINT to every process of the ``deepspeed`` command's group (runner, launch.py, ranks,
    data workers).  The ranks save at the next step boundary and exit 130; the same command resumes; the result
    equals an uninterrupted run's."""
    args = overrides(tmp_path / "x", digits_shards, **{"optimizer.max_steps": 20, "checkpoint.every_steps": 100})
    args = [a for a in args if not a.startswith("run_dir=")] + ["data.num_workers=1"]
    reference, run, log = tmp_path / "reference", tmp_path / "run", tmp_path / "interrupted.log"

    proc = launch(repo, [f"run_dir={reference}", *args], tmp_path / "reference.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    proc = launch(repo, [f"run_dir={run}", *args], log)
    with group_killed_at_exit(proc):
        wait_for_step(run, 3, proc, log)
        left = interrupt(proc, whole_group=True)
    text = log.read_text()
    assert left == [], text[-3000:]
    assert text.count("signal received: saved") == 1, text[-3000:]
    console_checks(text)
    saved = latest_tag(run / "checkpoints")
    assert saved is not None and 3 <= int(saved[4:]) < 20, text[-3000:]

    proc = launch(repo, [f"run_dir={run}", *args], tmp_path / "resumed.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert f"resumed from {run / 'checkpoints' / saved}" in (tmp_path / "resumed.log").read_text()
    expected, got = losses_by_step(reference), losses_by_step(run)
    assert sorted(got) == sorted(expected) == list(range(1, 21))
    for step in range(int(saved[4:]) + 1, 21):
        assert got[step] == expected[step], step  # bit-identical per-step losses after the resume point
    ref_w, got_w = final_weights(reference), final_weights(run)
    assert set(ref_w) == set(got_w) and all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)


@pytest.mark.slow
def test_ctrl_c_to_the_launcher_alone_saves_and_leaves_no_process(repo, digits_shards, tmp_path):
    """SIGINT to the ``deepspeed`` runner process only: it exits at once, and nothing signals launch.py or the ranks.
    The ranks notice that their launcher is gone, save and exit; launch.py follows; nothing is left."""
    run, log = tmp_path / "run", tmp_path / "job.log"
    long = {"optimizer.epochs": 100, "optimizer.max_steps": 2000, "checkpoint.every_steps": 10_000}
    proc = launch(repo, [*overrides(run, digits_shards, **long), "data.num_workers=1"], log)
    with group_killed_at_exit(proc):
        wait_for_step(run, 3, proc, log)
        assert len(group_members(proc.pid)) >= 4, group_members(proc.pid)  # runner, launch.py, two ranks (+ workers)
        left = interrupt(proc, whole_group=False)
    text = log.read_text()
    assert left == [], "\n".join(left) + "\n" + text[-3000:]
    assert text.count("launcher gone (deepspeed, pid") == 1 and "saved" in text, text[-3000:]
    console_checks(text)
    saved = latest_tag(run / "checkpoints")
    assert saved is not None and 3 <= int(saved[4:]) < 2000, text[-3000:]


@pytest.mark.slow
def test_ctrl_c_before_the_first_step_prints_one_line(repo, digits_shards, tmp_path):
    """Ctrl-C while the ranks start (importing, building): nothing to save, one line, no traceback from any rank."""
    run, log = tmp_path / "run", tmp_path / "job.log"
    proc = launch(repo, overrides(run, digits_shards), log)
    with group_killed_at_exit(proc):
        deadline = time.time() + 120
        while log.read_text().count("spawned with command") < 2 and time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(3)  # past Python's own start, well before the first step
        assert not (run / "metrics.jsonl").exists()
        left = interrupt(proc, whole_group=True)
    text = log.read_text()
    assert left == [], text[-3000:]
    assert text.count("interrupted: stopped without saving") == 1, text[-3000:]
    console_checks(text)
    assert latest_tag(run / "checkpoints") is None


@pytest.mark.slow
def test_a_config_error_of_a_two_rank_run_is_printed_once(repo, digits_shards, tmp_path):
    log = tmp_path / "job.log"
    proc = launch(repo, [*overrides(tmp_path / "run", digits_shards), "model.dropout=7"], log)
    try:
        rc = proc.wait(timeout=300)
    finally:
        left = wait_until_gone(proc.pid, timeout=60)
    text = log.read_text()
    assert rc == 2 and left == [], text[-3000:]
    assert text.count("config error:") == 1 and "model.dropout" in text, text[-3000:]
    console_checks(text)
