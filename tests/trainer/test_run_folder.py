"""The run folder's guards: one live run per folder, no silent config change on resume."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from trainer_helpers import child_env, overrides, run_in_process

from trainer.config import load_config, write_resolved
from trainer.run_folder import CHANGES_NAME, RunFolderError, RunFolderLock, check_config_change, record_config_change

REPO = Path(__file__).resolve().parents[2]


def tiny(run_dir: Path, *extra: str):
    return load_config(REPO / "configs/tiny_cpu.yaml", [f"run_dir={run_dir}", *extra])


def test_a_second_lock_on_the_folder_is_refused_until_the_first_is_released(tmp_path):
    first, second = RunFolderLock(tmp_path), RunFolderLock(tmp_path)
    first.acquire()
    with pytest.raises(RunFolderError, match=r"in use by a live run \(pid \d+ on "):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


def test_a_lock_held_by_another_process_is_refused_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import time
                from trainer.run_folder import RunFolderLock
                RunFolderLock({str(tmp_path)!r}).acquire()
                print("held", flush=True)
                time.sleep(60)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=f"pid {holder.pid} "):
            RunFolderLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunFolderLock(tmp_path)  # a killed holder leaves no stale lock
    lock.acquire()
    lock.release()


def test_a_changed_hyperparameter_is_refused_unless_allowed(tmp_path):
    write_resolved(tiny(tmp_path))
    changed = tiny(tmp_path, "optimizer.lr_per_256=0.5", "optimizer.max_steps=9")
    with pytest.raises(RunFolderError, match=r"optimizer.lr_per_256: 0.2 -> 0.5") as info:
        check_config_change(changed, tmp_path, allow=False)
    assert "max_steps" not in str(info.value)  # operational keys are not reasons to refuse
    changes = check_config_change(changed, tmp_path, allow=True)
    assert changes == {"optimizer.lr_per_256": (0.2, 0.5), "optimizer.max_steps": (None, 9)}
    record_config_change(tmp_path, changes, step=6)
    record_config_change(tmp_path, {"optimizer.epochs": (2, 3)}, step=8)
    lines = [json.loads(line) for line in (tmp_path / CHANGES_NAME).read_text().splitlines()]
    assert [line["step"] for line in lines] == [6, 8]
    assert lines[0]["changes"]["optimizer.lr_per_256"] == [0.2, 0.5]


def test_operational_changes_and_a_fresh_folder_pass(tmp_path):
    assert check_config_change(tiny(tmp_path), tmp_path, allow=False) == {}  # nothing recorded yet
    write_resolved(tiny(tmp_path))
    same = check_config_change(tiny(tmp_path, "data.num_workers=0", "log.every_steps=1"), tmp_path, allow=False)
    assert set(same) == {"data.num_workers", "log.every_steps"}


def test_the_trainer_refuses_a_locked_folder_and_records_allowed_changes(repo, digits_shards, tmp_path, single_rank):
    run = tmp_path / "run"
    run_in_process(repo, overrides(run, digits_shards, **{"optimizer.max_steps": 2}))
    lock = RunFolderLock(run)
    lock.acquire()
    try:
        with pytest.raises(RunFolderError, match="in use by a live run"):
            run_in_process(repo, overrides(run, digits_shards, **{"optimizer.max_steps": 4}))
    finally:
        lock.release()
    args = overrides(run, digits_shards, **{"optimizer.max_steps": 4, "optimizer.weight_decay": 0.001})
    trainer, results = run_in_process(repo, args, allow_config_change=True)
    assert trainer.resumed_from == "step000000002" and results["global_step"] == 4
    (line,) = (run / CHANGES_NAME).read_text().splitlines()
    assert json.loads(line)["changes"]["optimizer.weight_decay"] == [1e-05, 0.001]
    assert load_config(run / "config.yaml").optimizer.weight_decay == 0.001


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(tmp_path):
    """A missing data folder: one line, exit 2, and neither the run folder (nor its new parents) nor a lock."""
    run = tmp_path / "new/run"
    command = [sys.executable, str(REPO / "trainer/run.py"), "--config", str(REPO / "configs/tiny_cpu.yaml")]
    command += ["--set", f"run_dir={run}", f"data.root={tmp_path / 'no-such-data'}"]
    result = subprocess.run(command, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "prepare" in result.stderr  # the next step is named
    assert list(tmp_path.iterdir()) == []


def test_a_failed_start_in_an_existing_folder_keeps_the_folder(tmp_path):
    lock = RunFolderLock(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run/notes.txt").write_text("mine")
    lock.acquire()
    lock.release(discard=True)
    assert (tmp_path / "run/notes.txt").read_text() == "mine"
    fresh = RunFolderLock(tmp_path / "a/b/run")
    fresh.acquire()
    (tmp_path / "a/b/run/config.yaml").write_text("seed: 0\n")
    fresh.release(discard=True)
    assert list(tmp_path.iterdir()) == [tmp_path / "run"]
