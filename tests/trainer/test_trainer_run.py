"""The Trainer in-process (one rank): checkpoints, refusal of a foreign checkpoint, signals, non-finite
steps, consolidation; and real multi-process runs through the launcher: kill -9 and resume exactly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainer_helpers import final_weights, free_port, launch, losses_by_step, overrides, run_in_process

from data_pipeline import prepare as prep
from trainer.config import load_config
from trainer.state.checkpoint import latest_tag

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(digits_shards) -> Path:
    return digits_shards


def test_checkpoints_retention_resume_and_foreign_config(repo, digits, tmp_path, single_rank):
    run = tmp_path / "run"
    trainer, results = run_in_process(repo, overrides(run, digits))
    assert results["global_step"] == 6
    ckpt = run / "checkpoints"
    assert latest_tag(ckpt) == "step000000006"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step000000004", "step000000006"]  # keep 2
    assert (ckpt / "step000000006" / "trainer_rank0.pt").is_file()
    assert (run / "config.yaml").is_file()
    steps = [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss/largest" in line
    ]
    assert steps == [1, 2, 3, 4, 5, 6]
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val/top1_largest" in line]
    assert len(val) == 1 and 0 <= val[0]["val/top1_smallest"] <= 100
    console = (run / "console.log").read_text().splitlines()  # what rank 0 printed, dated
    assert any("val top-1" in line for line in console) and f"done: {run} holds" in console[-1]

    # Same command with a larger max_steps resumes from step 6 (not from scratch).
    trainer, results = run_in_process(repo, overrides(run, digits, **{"optimizer.max_steps": 8}))
    assert trainer.resumed_from == "step000000006" and results["global_step"] == 8

    # A different config is refused with a clear message; allowed, a different model config still is.
    from trainer.run_folder import RunFolderError
    from trainer.state.checkpoint import CheckpointError

    with pytest.raises(RunFolderError, match=r"model.dropout: 0.1 -> 0.3"):
        run_in_process(repo, overrides(run, digits, **{"model.dropout": 0.3}))
    with pytest.raises(CheckpointError, match="different model config"):
        run_in_process(repo, overrides(run, digits, **{"model.dropout": 0.3}), allow_config_change=True)

    # Consolidated fp32 weights reload into a supernet and equal the checkpointed module.
    from safetensors.torch import load_file

    from models import build_supernet
    from trainer.consolidate import consolidate

    path = consolidate(run)
    state = load_file(str(path))
    net = build_supernet(load_config(repo / "configs/tiny_cpu.yaml").model)
    net.load_state_dict(state)
    module_file = next((ckpt / "step000000008").glob("*model_states.pt"))
    saved = torch.load(module_file, weights_only=False)["module"]
    assert all(torch.equal(saved[k].float(), state[k]) for k in saved)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT])
def test_signal_saves_at_the_next_step_boundary(repo, digits, tmp_path, single_rank, monkeypatch, signum):
    """SLURM's USR1 and Ctrl-C's SIGINT (as SIGTERM) save at the next step boundary; the run's handlers are gone
    once it is closed."""
    from trainer import loop

    original = loop.Trainer.train_step

    def step_then_signal(self, batches):
        values = original(self, batches)
        if self.global_step == 3:
            os.kill(os.getpid(), signum)
        return values

    monkeypatch.setattr(loop.Trainer, "train_step", step_then_signal)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    _, results = run_in_process(repo, overrides(run, digits, **{"checkpoint.every_steps": 100}))
    assert results["stopped_by_signal"] and results["global_step"] == 3
    assert latest_tag(run / "checkpoints") == "step000000003"
    assert signal.getsignal(signal.SIGINT) is before


def test_non_finite_steps_are_skipped_then_stop_the_run(repo, digits, tmp_path, single_rank, monkeypatch):
    from trainer import loop, tasks

    real_normalize = tasks.normalize
    calls = {"n": 0}

    def poisoned(images, mean, std):
        calls["n"] += 1
        out = real_normalize(images, mean, std)
        return out * float("nan") if calls["n"] > 3 else out

    monkeypatch.setattr(tasks, "normalize", poisoned)
    run = tmp_path / "run"
    with pytest.raises(loop.TrainingStopped) as err:
        run_in_process(
            repo, overrides(run, digits, **{"optimizer.max_steps": 20, "optimizer.max_consecutive_bad_steps": 3})
        )
    message = str(err.value)
    assert "3 consecutive steps" in message and "step000000002" in message
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in lines] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


# ---- real processes through the deepspeed launcher -----------------------------------------------------
def test_kill_9_and_rerun_resumes_exactly(repo, digits, tmp_path):
    args = overrides(
        tmp_path / "x", digits, **{"optimizer.max_steps": 14, "checkpoint.every_steps": 4, "data.num_workers": 1}
    )
    args = [a for a in args if not a.startswith("run_dir=")]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"

    proc = launch(repo, [f"run_dir={reference}", *args], tmp_path / "reference.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    kill_after = random.Random(7).randint(5, 11)  # a step after the first checkpoint (step 4)
    semaphores_before = set(Path("/dev/shm").glob("sem.mp-*"))
    proc = launch(repo, [f"run_dir={interrupted}", *args], tmp_path / "interrupted.log")
    deadline = time.time() + 600
    while time.time() < deadline:
        metrics = interrupted / "metrics.jsonl"
        if metrics.is_file() and any(
            json.loads(line)["step"] >= kill_after for line in metrics.read_text().splitlines() if line.strip()
        ):
            break
        assert proc.poll() is None, (tmp_path / "interrupted.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The data workers' multiprocessing semaphores, which the killed group's resource tracker would have removed
    # (CHANGELOG): the test removes what the run left in /dev/shm.
    for semaphore in set(Path("/dev/shm").glob("sem.mp-*")) - semaphores_before:
        semaphore.unlink(missing_ok=True)
    assert latest_tag(interrupted / "checkpoints") is not None
    resumed_at = int(latest_tag(interrupted / "checkpoints")[4:])
    assert 4 <= resumed_at < 14

    proc = launch(repo, [f"run_dir={interrupted}", *args], tmp_path / "resumed.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "resumed.log").read_text()

    expected, got = losses_by_step(reference), losses_by_step(interrupted)
    assert sorted(got) == sorted(expected) == list(range(1, 15))
    for step in range(resumed_at + 1, 15):
        assert got[step] == expected[step], step  # bit-identical per-step losses after the resume point
    ref_w, got_w = final_weights(reference), final_weights(interrupted)
    assert set(ref_w) == set(got_w)
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)


def test_demo_recipe_reaches_its_accuracy(repo, tmp_path):
    """The tiny CPU recipe exactly as `make demo` runs it (2 processes, deepspeed launcher, bundled data)."""
    data = tmp_path / "digits"
    prep.prepare("digits", data, ["webdataset"], quiet=True)
    run = tmp_path / "demo"
    start = time.time()
    proc = launch(repo, [f"run_dir={run}", f"data.root={data}"], tmp_path / "demo.log")
    assert proc.wait(timeout=1200) == 0, (tmp_path / "demo.log").read_text()[-3000:]
    minutes = (time.time() - start) / 60
    final = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val/top1_largest" in line
    ][-1]
    print(
        f"demo: {minutes:.1f} min, top-1 largest {final['val/top1_largest']:.2f}%, smallest {final['val/top1_smallest']:.2f}%"
    )
    assert final["val/top1_largest"] >= 90.0 and final["val/top1_smallest"] >= 85.0
    assert "val top-1 largest" in (tmp_path / "demo.log").read_text()

    # The demo's export of tiny_m, fine-tuned with the inherited teacher (configs/tiny_finetune_cpu.yaml) through
    # the entry point: stopped at step 40, rerun to the end (resumes), evaluated, written to final/.
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    search = [sys.executable, "search/run.py", "--config", "configs/search_tiny_cpu.yaml", "--run", str(run)]
    search += ["--set", "search.population=8", "search.iterations=1", "--export", "tiny_m"]
    done = subprocess.run(search, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tuned = tmp_path / "tuned"
    tune = [sys.executable, "trainer/run.py", "--config", "configs/tiny_finetune_cpu.yaml", "--run-dir", str(tuned)]
    tune += ["--set", f"data.root={data}", f"task.student.export={run}/search/exports/tiny_m"]
    tune += [f"task.teacher.run={run}", "optimizer.epochs=2", "eval.every_epochs=1"]
    first = subprocess.run([*tune, "optimizer.max_steps=40"], cwd=repo, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    second = subprocess.run(tune, cwd=repo, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resumed from" in second.stdout and "val top-1 student" in second.stdout
    records = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    tuned_top1 = [r["val/top1_student"] for r in records if "val/top1_student" in r][-1]
    print(f"demo export tiny_m fine-tuned 2 epochs with the inherited teacher: top-1 {tuned_top1:.2f}%")
    assert tuned_top1 >= 80.0 and (tuned / "final" / "model.safetensors").is_file()


def test_plain_process_and_torchrun_entry_points(repo, digits, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = [
        "--config",
        "configs/tiny_cpu.yaml",
        "--set",
        *overrides(tmp_path / "plain", digits, **{"optimizer.max_steps": 2}),
    ]
    plain = subprocess.run(
        [sys.executable, "trainer/run.py", *args],
        cwd=repo,
        env={**env, "MASTER_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert latest_tag(tmp_path / "plain" / "checkpoints") == "step000000002"
    args = [
        "--config",
        "configs/tiny_cpu.yaml",
        "--set",
        *overrides(tmp_path / "torchrun", digits, **{"optimizer.max_steps": 2}),
    ]
    torchrun = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "trainer/run.py",
            *args,
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    assert "2 rank(s)" in torchrun.stdout
    # engine.keep_freed_host_memory, on by default (glibc), with the one arena trainer/run.py sets before imports
    assert "freed host memory kept (one malloc arena)" in torchrun.stdout
    assert (tmp_path / "torchrun" / "checkpoints" / "step000000002" / "trainer_rank1.pt").is_file()
    bad = subprocess.run(
        [sys.executable, "trainer/run.py", *args],
        cwd=repo,
        env={**env, "RANK": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "WORLD_SIZE" in bad.stderr


def test_a_second_ctrl_c_interrupts_at_once():
    """The first SIGINT asks for a save at the next step boundary; a second one, before it, interrupts."""
    from trainer.runtime.signals import StopSignals

    before = signal.getsignal(signal.SIGINT)
    signals = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGINT) is before
