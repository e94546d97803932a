"""Running the Trainer inside the test process (one rank, one process group for the whole session), the
environment of the processes that tests start, and runs of two ranks through the deepspeed launcher."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import load_config
from trainer.state.checkpoint import latest_tag

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent


def child_env(*, drop: Iterable[str] = (), **variables: str) -> dict[str, str]:
    """The environment of a Python process a test starts: this process's without the variables ``drop`` names,
    with ``variables`` set, and the repository first on ``PYTHONPATH``, so that a worker script (whose own folder
    Python puts first on its path) or ``python -m bench.NAME`` run from another folder imports this checkout's
    packages."""
    env = {k: v for k, v in os.environ.items() if k not in set(drop)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, **variables}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One port for the whole pytest process: DeepSpeed cannot re-initialise a process group after
# destroying it, so every in-process Trainer reuses the first one.
IN_PROCESS_PORT = free_port()

IN_PROCESS_ENV_KEYS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_STEP_ID",
)


def overrides(run_dir: Path, digits: Path, **extra) -> list[str]:
    """``--set`` overrides of configs/tiny_cpu.yaml for a few quick steps on one rank."""
    base = {
        "run_dir": run_dir,
        "data.root": digits,
        "data.batch_size": 16,
        "data.num_workers": 0,
        "optimizer.epochs": 2,
        "optimizer.max_steps": 6,
        "checkpoint.every_steps": 2,
        "log.every_steps": 1,
        "eval.every_epochs": 0,
        "eval.calib_batches": 2,
        "log.tensorboard": False,
        "checkpoint.keep": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_in_process(repo: Path, args: list[str], *, recipe: str = "configs/tiny_cpu.yaml", **trainer_kwargs):
    """(trainer, results) of one in-process run of ``recipe`` (the tiny one) with ``args`` as overrides."""
    from trainer.loop import Trainer

    trainer = Trainer(load_config(repo / recipe, args), **trainer_kwargs)
    try:
        return trainer, trainer.train()
    finally:
        trainer.close(destroy_process_group=False)  # DeepSpeed cannot re-initialise one in the same process


# ---- two ranks through the deepspeed launcher ------------------------------------------------------------------
def launch(repo, args: list[str], log: Path) -> subprocess.Popen:
    """``deepspeed --num_gpus 2 trainer/run.py --config configs/tiny_cpu.yaml --set ARGS`` on CPU, its output into
    ``log``, in a process group of its own (led by the launcher) that a test may signal as a terminal would."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    command += ["trainer/run.py", "--config", "configs/tiny_cpu.yaml", "--set", *args]
    return subprocess.Popen(
        command,
        cwd=repo,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    """In the launcher's child before it execs: Ctrl-C's default action back, as in a terminal.  A test run started
    in the background of a non-interactive shell (as CI may be) inherits SIGINT ignored, and Python then leaves it
    ignored: the ``deepspeed`` runner would not react to the Ctrl-C these tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def losses_by_step(run: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {
        r["step"]: {k: v for k, v in r.items() if k.startswith(("loss/", "kd_div/"))}
        for r in records
        if "loss/largest" in r
    }


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from trainer.consolidate import consolidated_state_dict

    return consolidated_state_dict(run / "checkpoints", latest_tag(run / "checkpoints"))[0]
