"""Where the metrics logger sends each record besides ``metrics.jsonl``: TensorBoard, Weights & Biases, MLflow.

A sink is a small object with ``log(step, values)`` and ``close()``; the :class:`~trainer.runtime.metrics.MetricsLogger`
calls every sink it was given, on rank 0 only.  W&B and MLflow are optional packages (extras of the project):
:func:`check_packages` names the missing one before a run does any work, and their modules are imported only when
the option is on.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any, Protocol

from trainer.sections import LogConfig
from typedconfig import ConfigError

__all__ = ["Sink", "build_sinks", "check_packages"]


class Sink(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None:
        """Record ``values`` (numbers only, ``step`` and ``epoch`` left out) at the optimizer step ``step``."""

    def close(self, *, failed: bool = False) -> None:
        """Flush and end: at the training's end, at a stop for a resume later, or after an error (``failed``)."""


def _needed_modules(log: LogConfig) -> list[tuple[str, str, list[str]]]:
    """(key, extra, modules) of every optional backend the config turns on."""
    needed = []
    if log.wandb.enabled:
        needed.append(("log.wandb.enabled", "wandb", ["wandb"]))
    if log.mlflow.enabled:
        uri = log.mlflow.tracking_uri
        database = uri is None or uri.startswith("sqlite:")  # MLflow's SQL store: SQLAlchemy and its migrations
        needed.append(("log.mlflow.enabled", "mlflow", ["mlflow", *(["sqlalchemy", "alembic"] if database else [])]))
    return needed


def check_packages(log: LogConfig) -> None:
    """:class:`ConfigError` naming the extra to install when an enabled backend's package is missing (found without
    importing it, so that this costs nothing)."""
    for key, extra, modules in _needed_modules(log):
        missing = [m for m in modules if find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"needs the package(s) {', '.join(missing)}: pip install 'alphanet-train[{extra}]'", key=key
            )


def build_sinks(log: LogConfig, run_dir: Path, *, run_config: dict[str, Any], start_step: int) -> list[Sink]:
    """The sinks ``log`` turns on, for rank 0; ``run_config``: the resolved config as plain values."""
    sinks: list[Sink] = []
    if log.tensorboard:
        from trainer.runtime.sinks.tensorboard_sink import TensorBoardSink

        sinks.append(TensorBoardSink(run_dir, start_step=start_step))
    if log.wandb.enabled:
        from trainer.runtime.sinks.wandb_sink import WandbSink

        sinks.append(WandbSink(log.wandb, run_dir, run_config=run_config))
    if log.mlflow.enabled:
        from trainer.runtime.sinks.mlflow_sink import MlflowSink

        sinks.append(MlflowSink(log.mlflow, run_dir, run_config=run_config))
    return sinks
