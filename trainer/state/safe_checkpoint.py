"""Checkpoint files read without running code, and written so that a failure is reported, not raised.

Every ``.pt`` file of a run (DeepSpeed's shards and our per-rank trainer state) is read with
``torch.load(weights_only=True)``: tensors, numbers, strings and containers, plus the few DeepSpeed
classes its optimizer shards hold (:data:`DEEPSPEED_SAFE_GLOBALS`).  A file that asks for anything else
is refused with :class:`CheckpointFileError` naming it; so is a file that cannot be parsed.

:class:`GuardedCheckpointEngine` replaces DeepSpeed's checkpoint engine on our engines.  It loads through
:func:`safe_load`, and it writes each file to a temporary name, fsyncs and renames it.  A write that
fails (disk full, permissions) is *recorded* instead of raised, so every rank still reaches DeepSpeed's
own barriers and then the all-reduced success flag in :class:`trainer.state.checkpoint.Checkpointer`; raising
on one rank inside DeepSpeed's save would leave the others waiting in a barrier until the timeout.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from fileops import atomic_output

DEEPSPEED_SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
"""Classes DeepSpeed 0.19's ZeRO optimizer shards pickle (loss scaler, stage enum, fragment addresses):
plain data holders whose reconstruction runs no code of the file's choosing."""


class CheckpointFileError(RuntimeError):
    """A checkpoint file that cannot be read safely: corrupt, truncated, or asking to run code."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` restricted to data (``weights_only=True`` + :data:`DEEPSPEED_SAFE_GLOBALS`)."""
    try:
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported" in line), "")
        raise CheckpointFileError(
            path, f"refused to load: it holds objects other than tensors and plain data ({detail or exc})"
        ) from None
    except FileNotFoundError:
        raise CheckpointFileError(path, "missing") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointFileError(path, f"corrupt or truncated ({type(exc).__name__}: {exc})") from None


class GuardedCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with safe loads and atomic, failure-recording saves."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.failures: list[str] = []
        """``path: error`` of every write that failed since :meth:`reset_failures`."""
        self.preloaded: dict[str, Any] = {}
        """Files already read (and checked) by the caller, by path: :meth:`load` takes them from here."""

    def reset_failures(self) -> None:
        self.failures.clear()

    def record(self, path: str | Path, exc: BaseException) -> None:
        self.failures.append(f"{path}: {type(exc).__name__}: {exc}")

    def makedirs(self, path, exist_ok=False):
        try:
            super().makedirs(path, exist_ok=exist_ok)
        except OSError as exc:
            self.record(path, exc)

    def save(self, state_dict, path: str):
        try:
            with atomic_output(path) as tmp:
                torch.save(state_dict, tmp, _use_new_zipfile_serialization=self.zipfile_serialization)
        except OSError as exc:
            self.record(path, exc)

    def load(self, path: str, map_location=None):
        if str(path) in self.preloaded:
            return self.preloaded.pop(str(path))
        return safe_load(path, map_location=map_location)


def install_guarded_engine(engine) -> GuardedCheckpointEngine:
    """Give a DeepSpeed engine our checkpoint engine (also for the recovery scripts rank 0 copies)."""
    guarded = GuardedCheckpointEngine(engine._config)
    engine.checkpoint_engine = guarded
    copy_scripts = engine._copy_recovery_script

    def copy_recovery_script(save_path):
        try:
            copy_scripts(save_path)
        except OSError as exc:
            guarded.record(save_path, exc)

    engine._copy_recovery_script = copy_recovery_script
    return guarded
