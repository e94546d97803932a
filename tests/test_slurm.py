"""The SLURM templates on a real single-node SLURM cluster started on localhost by slurm/localcluster.sh.

Skipped (with the reason) where that is impossible: not root, or slurmctld/slurmd/munge not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_pipeline import prepare as prep
from trainer.state.checkpoint import latest_tag

pytestmark = pytest.mark.slow
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, repo):
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root")
    missing = [
        t
        for t in ("slurmctld", "slurmd", "sbatch", "munged")
        if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()
    ]
    if missing:
        pytest.skip(f"SLURM packages not installed ({missing}); apt-get install slurmctld slurmd slurm-client munge")
    folder = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(
        [str(repo / "slurm/localcluster.sh"), "start", str(folder)], capture_output=True, text=True, timeout=120
    )
    if start.returncode != 0:
        pytest.skip(f"local SLURM cluster did not start: {start.stderr.strip()[-500:]}")
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    data = folder / "digits"
    prep.prepare("digits", data, ["webdataset"], quiet=True)
    yield {"env": env, "data": data, "dir": folder}
    subprocess.run([str(repo / "slurm/localcluster.sh"), "stop", str(folder)], timeout=60)


def submit(cluster, repo, script: str, log: Path, export: dict[str, str], args: list[str]) -> str:
    exports = ",".join(
        ["ALL", "GPUS_PER_NODE=0", f"REPO={repo}", f"PYTHON={sys.executable}", *(f"{k}={v}" for k, v in export.items())]
    )
    cmd = [
        "sbatch",
        "--parsable",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--gpus-per-node=0",
        "--time=30",
        f"--output={log}",
        f"--export={exports}",
        str(repo / script),
        *args,
    ]
    out = subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def job_fields(cluster, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=cluster["env"], capture_output=True, text=True)
    return dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)


def wait(cluster, job: str, timeout: float, log: Path) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        fields = job_fields(cluster, job)
        if fields.get("JobState") in FINAL_STATES:
            return fields
        time.sleep(1)
    subprocess.run(["scancel", job], env=cluster["env"])
    raise AssertionError(f"job {job} did not finish in {timeout} s:\n{log.read_text()[-3000:] if log.exists() else ''}")


def tiny_args(cluster, **extra) -> list[str]:
    values = {"data.root": cluster["data"], "data.num_workers": 0, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def test_tiny_recipe_job_reaches_accuracy_then_search_job(cluster, repo, tmp_path):
    run, log = tmp_path / "run #1", tmp_path / "train.log"  # a '#' must not cut the path (it is not YAML)
    job = submit(
        cluster, repo, "slurm/alphanet.sh", log, {"CONFIG": "configs/tiny_cpu.yaml", "RUN_DIR": run}, tiny_args(cluster)
    )
    fields = wait(cluster, job, 1500, log)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", text[-3000:]
    assert "val top-1 largest" in text
    final = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val/top1_largest" in line
    ][-1]
    assert final["val/top1_largest"] >= 90.0 and final["val/top1_smallest"] >= 85.0

    search_log = tmp_path / "search.log"
    job = submit(
        cluster,
        repo,
        "slurm/search.sh",
        search_log,
        {"SEARCH_CONFIG": "configs/search_tiny_cpu.yaml", "RUN_DIR": run},
        ["--set", "search.population=8", "search.iterations=1", "--export", "pareto@2"],
    )
    fields = wait(cluster, job, 900, search_log)
    assert fields["JobState"] == "COMPLETED", search_log.read_text()[-3000:]
    assert (run / "search" / "front.png").is_file() and "Pareto front" in search_log.read_text()
    assert (run / "search" / "exports" / "pareto_2mflops" / "model.onnx").is_file()


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from trainer.consolidate import consolidated_state_dict

    return consolidated_state_dict(run / "checkpoints", latest_tag(run / "checkpoints"))[0]


def test_preempted_job_saves_requeues_resumes_and_matches(cluster, repo, tmp_path):
    common = tiny_args(
        cluster,
        **{
            "optimizer.max_steps": 30,
            "checkpoint.every_steps": 1000,
            "log.every_steps": 1,
            "eval.every_epochs": 0,
            "data.batch_size": 16,
        },
    )
    reference, ref_log = tmp_path / "reference", tmp_path / "reference.log"
    job = submit(
        cluster, repo, "slurm/alphanet.sh", ref_log, {"CONFIG": "configs/tiny_cpu.yaml", "RUN_DIR": reference}, common
    )
    assert wait(cluster, job, 900, ref_log)["JobState"] == "COMPLETED", ref_log.read_text()[-3000:]

    run, log = tmp_path / "preempted", tmp_path / "preempted.log"
    job = submit(cluster, repo, "slurm/alphanet.sh", log, {"CONFIG": "configs/tiny_cpu.yaml", "RUN_DIR": run}, common)
    deadline = time.time() + 600
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 8:
            break
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster["env"], check=True)
    fields = wait(cluster, job, 900, log)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", text[-3000:]
    assert fields["Restarts"] == "1", fields
    assert "signal received: saved" in text and "requeueing SLURM job" in text and "resumed from" in text
    print(subprocess.run(["scontrol", "show", "job", job], env=cluster["env"], capture_output=True, text=True).stdout)
    ref, got = final_weights(reference), final_weights(run)
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
