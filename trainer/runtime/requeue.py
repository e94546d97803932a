"""Requeue under SLURM after a signal-triggered save (``slurm/alphanet.sh`` sets ``ALPHANET_REQUEUE_ON_SIGNAL``)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable


def requeue_if_asked(is_main: bool, say: Callable[[str], None], before: Callable[[], None]) -> bool:
    """Under slurm/alphanet.sh: rank 0 requeues the job once the checkpoint is committed (SLURM kills the job at
    once on requeue, so this must come last; ``before`` runs first, e.g. closing the logs).  Returns whether the
    job is being requeued."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("ALPHANET_REQUEUE_ON_SIGNAL") != "1" or not job:
        return False
    if is_main:
        say(f"requeueing SLURM job {job}")
        before()
        subprocess.run(["scontrol", "requeue", job], check=False)
    return True
