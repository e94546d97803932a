"""The root run config: composes every component's section, loads strict YAML, applies overrides.

``python -m trainer.config --config configs/X.yaml [--set model.dropout=0.1 ...]`` validates a config
and prints it resolved (every default filled in); a problem exits with code 2 and names the key and
the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml

from data_pipeline.config import DataConfig
from fileops import atomic_write_text
from losses.config import LossConfig
from models import SearchSpace, load_search_space
from models.config import ModelConfig
from models.families import family_of
from trainer.standalone_config import StandaloneConfig
from trainer.trainer_config import TrainerConfig
from typedconfig import (
    ConfigError,
    Range,
    add_set_argument,
    apply_overrides,
    check_ranges,
    from_mapping,
    load_yaml,
    to_mapping,
)

RESOLVED_CONFIG_NAME = "config.yaml"


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
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    standalone: StandaloneConfig | None = None
    """Train one network (fine-tuning, transfer, fixed-teacher distillation) instead of a supernet."""

    def __post_init__(self) -> None:
        check_ranges(self, "")


def _cross_check(config: RunConfig, source: str) -> SearchSpace:
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
    if config.model.sharing == "local":
        _check_local_sharing(config, space, source)
    standalone = config.standalone
    if standalone is not None:
        if standalone.teacher is not None and config.loss.kd_loss == "none":
            raise ConfigError(
                "a teacher needs a KD loss (loss.kd_loss is none)", key="standalone.teacher", source=source
            )
        if standalone.teacher is None and standalone.teacher_logits == "cached":
            raise ConfigError("cached teacher logits need a teacher", key="standalone.teacher_logits", source=source)
        if config.trainer.activation_checkpointing:
            raise ConfigError(
                "activation checkpointing is implemented in the supernets' forward, not for a standalone network",
                key="trainer.activation_checkpointing",
                source=source,
            )
    return space


def _check_local_sharing(config: RunConfig, space: SearchSpace, source: str) -> None:
    """Local weight sharing runs on the AlphaNet family's supernet with the in-place teacher and uniform sampling."""
    tc = config.trainer
    problems = {
        "model.search_space": f"the {family_of(space).name} family's supernet has no per-layer candidates"
        if not family_of(space).supports_local_sharing
        else "",
        "standalone": "a standalone run trains one network" if config.standalone is not None else "",
        "trainer.zero_stage": "ZeRO-3 partitions the candidates it routes gradients between"
        if tc.zero_stage == 3
        else "",
        "trainer.teacher": f"the {tc.teacher} teacher's snapshots have no assignment"
        if tc.teacher != "inplace"
        else "",
        "trainer.sampler": "attentive sampling would choose the pair it must force" if tc.sampler != "uniform" else "",
        "trainer.num_subnets": "a pair of middle sub-networks is needed (num_subnets >= 4)"
        if tc.num_subnets < 4 and config.model.local.assignment == "learned"
        else "",
    }
    for key, problem in problems.items():
        if problem:
            raise ConfigError(f"not with model.sharing: local: {problem}", key=key, source=source)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path``, apply ``section.key=value`` overrides, build and validate the typed config."""
    data = apply_overrides(load_yaml(path), overrides or [])
    source = f"{path} (with --set overrides)" if overrides else str(path)
    config = from_mapping(RunConfig, data, source=source)
    _cross_check(config, source)
    return config


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_mapping(config), sort_keys=False)


def config_hash(section: Any) -> str:
    """A stable short hash of a config section (e.g. the model section, stored in checkpoints)."""
    return hashlib.sha256(json.dumps(to_mapping(section), sort_keys=True).encode()).hexdigest()[:16]


def write_resolved(config: RunConfig, run_dir: Path | None = None) -> Path:
    """Write the resolved config into the run folder (atomically) and return its path."""
    run_dir = Path(run_dir or config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(run_dir / RESOLVED_CONFIG_NAME, config_to_yaml(config))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML, e.g. configs/tiny_cpu.yaml")
    add_set_argument(parser, example="--set model.dropout=0.1 loss.kd_loss=kl")
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="the run folder, taken literally (unlike --set run_dir=..., whose value is parsed as YAML)",
    )


def load_config_or_exit(args: argparse.Namespace) -> RunConfig:
    """Entry points call this: a config problem prints one clear line and exits with code 2."""
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    if getattr(args, "run_dir", None) is not None:
        config.run_dir = args.run_dir
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.config", description="Validate and print a resolved run config."
    )
    add_config_arguments(parser)
    config = load_config_or_exit(parser.parse_args(argv))
    print(config_to_yaml(config), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
