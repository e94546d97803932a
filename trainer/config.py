"""The root run config: composes every component's section, loads strict YAML, applies overrides.

``python -m trainer.config --config configs/X.yaml [--set model.dropout=0.1 ...]`` validates a config
and prints it resolved (every default filled in); a problem exits with code 2 and names the key and
the file.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import yaml

from data_pipeline.config import DataConfig
from fileops import atomic_write_text
from losses.config import LossConfig
from models.config import ModelConfig
from models.families import Space, load_search_space
from trainer.config_keys import RESOLVED_CONFIG_NAME, config_hash, current_keys, current_overrides
from trainer.paths import config_anchor
from trainer.sections import CheckpointConfig, EngineConfig, EvalConfig, LogConfig, OptimizerConfig
from trainer.tasks import TASKS, TaskConfig
from typedconfig import (
    ConfigError,
    Range,
    add_set_argument,
    apply_overrides,
    check_ranges,
    from_mapping,
    load_yaml,
    parse_override,
    to_mapping,
)
from typedconfig.paths import absolute, anchor_paths

__all__ = ["RESOLVED_CONFIG_NAME", "RunConfig", "config_hash", "load_config", "model_hash"]


def _default_task() -> TaskConfig:
    return TASKS.config_class("sandwich")()


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Everything one run needs; each component reads only its own section."""

    seed: Annotated[int, Range(ge=0)] = 0
    """Seed of every random generator (architecture sampler, data order, initialisation)."""
    run_dir: Path = Path("runs/default")
    """Folder of the run: resolved config, logs, metrics, checkpoints."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    task: TaskConfig = field(default_factory=_default_task)
    """What a step trains: ``sandwich`` (a supernet, with its sampler, teacher) or ``one_network`` (distil,
    fine-tune, transfer one network)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        check_ranges(self, "")


def _cross_check(config: RunConfig, source: str) -> Space:
    """Checks that involve several sections (and loading the search space named by the model)."""
    try:
        space = load_search_space(config.model.search_space)
    except ConfigError as exc:
        raise ConfigError(str(exc), key="model.search_space", source=source) from exc
    if config.data.base_resolution % space.total_stride:
        raise ConfigError(
            f"{config.data.base_resolution} is not divisible by the total stride {space.total_stride} of search space "
            f"'{space.name}'",
            key="data.base_resolution",
            source=source,
        )
    TASKS.get(config.task.name).check_config(config, space, source)
    return space


def load_config(path: str | Path, overrides: list[str] | None = None, *, notes: list[str] | None = None) -> RunConfig:
    """Read ``path``, apply ``section.key=value`` overrides, move old keys to their place (a line per old key
    into ``notes``), build and validate the typed config; relative paths made absolute by the rule of
    :mod:`trainer.paths` (the file's folder or the repository; the shell's folder for ``--set`` values)."""
    source = f"{path} (with --set overrides)" if overrides else str(path)
    data = current_keys(load_yaml(path), source=path, notes=notes)
    given = current_overrides(overrides or [], notes=notes)
    data = apply_overrides(data, given, cls=RunConfig)
    config = from_mapping(RunConfig, data, source=source)
    anchor_paths(config, config_anchor(Path(path), [".".join(parse_override(text)[0]) for text in given]))
    _cross_check(config, source)
    return config


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_mapping(config), sort_keys=False)


def model_hash(config: RunConfig) -> str:
    """The hash of what gives the weights their meaning, stored in checkpoints: the model section's identity,
    and the task's where it has one (a one-network run's student and teacher)."""
    model = config_hash(config.model.identity())
    extra = config.task.weights_identity()
    return model if extra is None else config_hash({"model": model, "standalone": extra})


def write_resolved(config: RunConfig, run_dir: Path | None = None) -> Path:
    """Write the resolved config into the run folder (atomically) and return its path."""
    run_dir = Path(run_dir or config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(run_dir / RESOLVED_CONFIG_NAME, config_to_yaml(config))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Every config key, with its type, default and meaning: docs/config.md. "
        "--print-config prints the config as it resolves, without training."
    )
    parser.add_argument("--config", required=True, help="run config YAML, e.g. configs/tiny_cpu.yaml")
    add_set_argument(parser, example="--set model.dropout=0.1 loss.kd_loss=kl")
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="the run folder, taken literally (unlike --set run_dir=..., whose value is parsed as YAML)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config (every default filled in) and exit"
    )


def load_config_or_exit(
    args: argparse.Namespace, *, notes: list[str] | None = None, print_error: bool = True
) -> RunConfig:
    """Entry points call this: a config problem prints one clear line (unless ``print_error`` is false: another
    process prints it) and exits with code 2."""
    try:
        config = load_config(args.config, args.overrides, notes=notes)
    except ConfigError as exc:
        if print_error:
            print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    if getattr(args, "run_dir", None) is not None:
        config.run_dir = absolute(args.run_dir, Path.cwd())
    if getattr(args, "print_config", False):
        print(config_to_yaml(config), end="")
        sys.exit(0)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.config", description="Validate and print a resolved run config."
    )
    add_config_arguments(parser)
    notes: list[str] = []
    config = load_config_or_exit(parser.parse_args(argv), notes=notes)
    for note in notes:
        print(note, file=sys.stderr)
    print(config_to_yaml(config), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
