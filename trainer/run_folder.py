"""The run folder's guards: one live run at a time (a lock), and no silent change of a run's config.

``<run>/.lock`` is held (``flock``) by rank 0 for as long as the run trains; a second run on the same
folder stops at once, naming the host and process that hold it.  The lock is released when that
process ends, however it ends, so a killed run never leaves a stale lock behind.

``<run>/config.yaml`` is the config the run was started with.  Resuming with a different one is refused
unless ``--allow-config-change`` is given, except for keys that change neither the weights nor the
data order (:data:`OPERATIONAL_KEYS`: run length, logging, checkpoint cadence, threads, workers,
activation checkpointing); every accepted change is appended to ``<run>/config_changes.jsonl``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from fileops import atomic_write_text
from trainer.config import RESOLVED_CONFIG_NAME, RunConfig
from trainer.config_keys import current_keys
from trainer.paths import recorded_anchor
from typedconfig import ConfigError, dotted_items, from_mapping, to_mapping
from typedconfig.paths import anchor_paths

LOCK_NAME = ".lock"
CHANGES_NAME = "config_changes.jsonl"
OPERATIONAL_KEYS = frozenset(
    {
        "run_dir",
        "data.num_workers",
        "optimizer.max_steps",
        "optimizer.max_consecutive_bad_steps",
        "log.every_steps",
        "log.tensorboard",
        *(f"log.wandb.{key}" for key in ("enabled", "project", "entity", "name", "mode")),
        *(f"log.mlflow.{key}" for key in ("enabled", "tracking_uri", "experiment", "run_name")),
        "eval.every_epochs",
        "eval.calib_batches",
        "checkpoint.every_steps",
        "checkpoint.keep",
        "engine.threads_per_rank",
        "engine.keep_freed_host_memory",
        "engine.zero3_gather",
        "engine.activation_checkpointing",
        "engine.dist_timeout_s",
    }
)
"""Keys a resumed run may change freely: they affect neither the weights nor the order of the data."""


class RunFolderError(RuntimeError):
    """The run folder is in use by another live run, or its config would change without permission."""


class RunFolderLock:
    """An exclusive ``flock`` on ``<run>/.lock``; the file records who holds it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None
        self._made: list[Path] = []  # the folders acquire() created, innermost first

    def acquire(self) -> None:
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._made = missing
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(
                f"{self.path.parent} is in use by a live run ({holder}); wait for it to end or use another run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}\n".encode(), 0)
        self._fd = fd

    def release(self, *, discard: bool = False) -> None:
        """Drop the lock; with ``discard`` (a run that failed before its first step), also remove the run folder
        and its parents when this lock made them: a failed start leaves nothing behind."""
        if self._fd is not None and discard and self._made:
            shutil.rmtree(self.path.parent, ignore_errors=True)
            for folder in self._made[1:]:
                try:
                    folder.rmdir()  # only while empty: another run may have started beside it
                except OSError:
                    break
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def config_changes(previous: dict[str, Any], current: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{key: (previous, current)}`` for every key that differs (keys only one side has included)."""
    old = dotted_items(previous)
    new = dotted_items(yaml.safe_load(yaml.safe_dump(to_mapping(current))))  # the form config.yaml stores
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def _in_current_keys(recorded: dict[str, Any]) -> dict[str, Any]:
    """A run folder's recorded config in today's keys, with today's defaults for keys added since and its
    relative paths (written before 0.2) made absolute (what the same file means to this version); as
    recorded, old keys moved, when it no longer validates."""
    translated = current_keys(recorded)
    try:
        config = from_mapping(RunConfig, translated)
    except ConfigError:
        return translated
    anchor_paths(config, recorded_anchor)
    return to_mapping(config)


def check_config_change(config: RunConfig, run_dir: Path, *, allow: bool) -> dict[str, tuple[Any, Any]]:
    """The changes against the run's recorded config; :class:`RunFolderError` when one of them is not
    operational and ``allow`` is false.  A run folder without ``config.yaml`` has no changes."""
    recorded = Path(run_dir) / RESOLVED_CONFIG_NAME
    if not recorded.is_file():
        return {}
    try:
        previous = yaml.safe_load(recorded.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RunFolderError(f"{recorded} is not readable YAML ({exc}); restore it or use another run_dir") from None
    changes = config_changes(_in_current_keys(previous), config)
    guarded = {k: v for k, v in changes.items() if k not in OPERATIONAL_KEYS}
    if guarded and not allow:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in guarded.items())
        raise RunFolderError(
            f"this run was started with a different config ({recorded}): {listed}. Resume with the original "
            "config, use another run_dir, or pass --allow-config-change to continue with the new values"
        )
    return changes


def record_config_change(run_dir: Path, changes: dict[str, tuple[Any, Any]], step: int) -> None:
    """Append one JSON line describing ``changes`` (made when resuming at ``step``)."""
    if not changes:
        return
    path = Path(run_dir) / CHANGES_NAME
    line = json.dumps(
        {"time": time.strftime("%F %T"), "step": step, "changes": {k: list(v) for k, v in changes.items()}},
        default=str,
    )
    previous = path.read_text() if path.is_file() else ""
    atomic_write_text(path, previous + line + "\n")
