"""Weights & Biases: the records into one W&B run per run folder, continued on resume."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from fileops import atomic_write_text
from trainer.sections import WandbConfig

RUN_ID_FILE = "wandb_run_id"
"""In the run folder: the W&B run's id, chosen at the first start and reused by every resume."""


def run_id(run_dir: Path) -> str:
    """The run folder's W&B run id, written before W&B starts (so a start that fails half-way is continued too)."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file() and (kept := path.read_text().strip()):
        return kept
    chosen = secrets.token_hex(6)  # W&B ids: letters, digits, - and _
    atomic_write_text(path, chosen + "\n")
    return chosen


class WandbSink:
    def __init__(self, config: WandbConfig, run_dir: Path, *, run_config: dict[str, Any]):
        import wandb

        run_dir = Path(run_dir)
        self._run = wandb.init(
            project=config.project,
            entity=config.entity,
            name=config.name or run_dir.resolve().name,
            id=run_id(run_dir),
            resume="allow",  # the same id continues the run it names, or starts it
            mode=config.mode,
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),  # W&B's files in RUN/wandb/
        )
        # After init: a resume that was allowed to change the config updates the values it changed.
        self._run.config.update(run_config, allow_val_change=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        # W&B keeps one row per step and drops steps below its last one: after a resume from a checkpoint older
        # than a killed run's last records, the steps in between keep the killed run's values.
        self._run.log(values, step=step)

    def close(self, *, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)  # W&B shows a failed run as such
