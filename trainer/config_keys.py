"""The run config's file name, and the one table of renamed config keys.

Keys renamed in a release keep working for one more release: :func:`current_keys` rewrites a mapping read
from a YAML file, a run folder's ``config.yaml`` or the ``--set`` flags (applied first) into today's keys, and
says what it rewrote, for a one-line deprecation note.  Subsections of a choice that was not taken (e.g. the
old ``trainer.attentive`` of a run whose sampler was ``uniform``, which every resolved config holds) are
dropped: they never had an effect.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from typedconfig import ConfigError, to_mapping

RESOLVED_CONFIG_NAME = "config.yaml"

REMOVED_IN = "0.3"
"""The release that stops reading the old keys below."""

_OPTIMIZER = [
    "epochs",
    "max_steps",
    "lr_per_256",
    "warmup_epochs",
    "lr_schedule",
    "momentum",
    "nesterov",
    "weight_decay",
    "grad_clip_value",
    "gradient_accumulation_steps",
    "max_consecutive_bad_steps",
]
_ENGINE = [
    "zero_stage",
    "contiguous_gradients",
    "coalesce_grad_reduction",
    "zero3_gather",
    "channels_last",
    "activation_checkpointing",
    "threads_per_rank",
    "keep_freed_host_memory",
    "dist_timeout_s",
]
SECTION_KEYS: dict[str, str] = {
    **{f"trainer.{key}": f"optimizer.{key}" for key in _OPTIMIZER},
    **{f"trainer.{key}": f"engine.{key}" for key in _ENGINE},
    "trainer.checkpoint_every_steps": "checkpoint.every_steps",
    "trainer.keep_checkpoints": "checkpoint.keep",
    "trainer.eval_every_epochs": "eval.every_epochs",
    "trainer.calib_batches": "eval.calib_batches",
    "trainer.log_every_steps": "log.every_steps",
    "trainer.tensorboard": "log.tensorboard",
}
"""The ``trainer:`` section's keys that moved one for one to a section by concern."""
PRECISION_FLAGS = {"trainer.bf16": "bf16", "trainer.bf16_autocast": "bf16_autocast"}
"""Two booleans for one choice, now ``engine.precision``: true is that precision, false ``fp32``."""

RENAMED: dict[str, str] = {
    "standalone": "task (name: one_network)",
    "trainer.num_subnets": "task.num_subnets",
    "trainer.sampler": "task.sampler.name",
    "trainer.attentive": "task.sampler",
    "trainer.teacher": "task.teacher.name",
    "trainer.voted": "task.teacher",
    "model.local": "model.sharing",
    **SECTION_KEYS,
    **{key: "engine.precision" for key in PRECISION_FLAGS},
}
"""Old key (a section stands for every key under it) → today's, as the deprecation note prints it."""

_CHOICES = {
    # old selector key, old subsection, new tagged section, names that use the subsection
    "sampler": ("sampler", "attentive", {"attentive"}),
    "teacher": ("teacher", "voted", {"voted", "inplace_and_voted"}),
}


def _section(mapping: dict, key: str, source: Any) -> dict:
    value = mapping.get(key)
    if value is None:
        value = mapping[key] = {}
    if isinstance(value, str):  # a tagged section given by its name alone
        value = mapping[key] = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping, got {type(value).__name__}", key=key, source=source)
    return value


def _move_sections(data: dict[str, Any], source: Any) -> list[str]:
    """The ``trainer:`` section's remaining keys into their sections by concern (in place); the old keys found."""
    trainer = data.get("trainer")
    if not isinstance(trainer, dict):
        if trainer is None:
            data.pop("trainer", None)
        return []
    found = []
    del data["trainer"]
    flags = {flag: trainer[flag.split(".")[1]] for flag in PRECISION_FLAGS if flag.split(".")[1] in trainer}
    on = [flag for flag, value in flags.items() if value]
    if len(on) > 1:
        raise ConfigError("trainer.bf16 and trainer.bf16_autocast are one choice: engine.precision", source=source)
    for key, value in trainer.items():
        old = f"trainer.{key}"
        if old in PRECISION_FLAGS:
            found.append(old)
            continue
        if old not in SECTION_KEYS:
            raise ConfigError(
                "unknown key; the trainer section's keys moved to optimizer, engine, checkpoint, eval and log "
                "(docs/architecture.md)",
                key=old,
                source=source,
            )
        found.append(old)
        section, name = SECTION_KEYS[old].split(".")
        _section(data, section, source).setdefault(name, value)
    if flags:
        _section(data, "engine", source).setdefault("precision", PRECISION_FLAGS[on[0]] if on else "fp32")
    return found


def _move_local_sharing(data: dict[str, Any], source: Any) -> list[str]:
    """0.1's ``model.sharing: NAME`` + ``model.local: {...}`` into one tagged ``model.sharing`` (in place); the
    old subsection is read only when the sharing rule was ``local``."""
    model = data.get("model")
    if not isinstance(model, dict) or "local" not in model:
        return []
    local = model.pop("local") or {}
    sharing = model.get("sharing", "global")
    name = sharing.get("name", "global") if isinstance(sharing, dict) else sharing
    if name == "local":
        rest = sharing if isinstance(sharing, dict) else {}
        model["sharing"] = {"name": "local", **local, **{k: v for k, v in rest.items() if k != "name"}}
    return ["model.local"]


def _note(where: str, found: list[str]) -> str:
    """One line for every old key found in one place."""
    moved = ", ".join(f"{key} -> {RENAMED[key]}" for key in dict.fromkeys(found))
    return f"{where}: keys renamed in 0.2, read until {REMOVED_IN} (docs/architecture.md): {moved}"


def current_keys(data: dict[str, Any], *, source: str | Path | None = None, notes: list[str] | None = None) -> dict:
    """``data`` with every old key of :data:`RENAMED` moved to its new place (a copy); each old key found adds
    one line to ``notes``."""
    data = copy.deepcopy(data)
    found: list[str] = []
    trainer = data.get("trainer")
    trainer = trainer if isinstance(trainer, dict) else {}
    standalone = data.pop("standalone", None)
    if standalone is not None:
        found.append("standalone")
        if not isinstance(standalone, dict):
            raise ConfigError(f"expected a mapping, got {type(standalone).__name__}", key="standalone", source=source)
        task = _section(data, "task", source)
        if task.get("name", "one_network") != "one_network":
            raise ConfigError("a standalone section needs task.name: one_network", key="standalone", source=source)
        data["task"] = {"name": "one_network", **standalone, **{k: v for k, v in task.items() if k != "name"}}
    one_network = isinstance(data.get("task"), dict) and data["task"].get("name") == "one_network"
    moved = [key for key in ("num_subnets", "sampler", "attentive", "teacher", "voted") if key in trainer]
    if moved:
        found += [f"trainer.{key}" for key in moved]
        values = {key: trainer.pop(key) for key in moved}
        if not one_network:  # a one-network run never used them
            task = _section(data, "task", source)
            if "num_subnets" in values:
                task.setdefault("num_subnets", values["num_subnets"])
            for field, (selector, subsection, users) in _CHOICES.items():
                piece = _section(task, field, source)
                if selector in values:
                    if "name" in piece and piece["name"] != values[selector]:
                        raise ConfigError(
                            f"given as both trainer.{selector} ({values[selector]!r}) and task.{field}.name "
                            f"({piece['name']!r}); keep task.{field}.name",
                            key=f"trainer.{selector}",
                            source=source,
                        )
                    piece["name"] = values[selector]
                if subsection in values and piece.get("name") in users:
                    for key, value in (values[subsection] or {}).items():
                        piece.setdefault(key, value)
                if not piece:
                    del task[field]
    found += _move_sections(data, source) + _move_local_sharing(data, source)
    if notes is not None and found:
        notes.append(_note(f"config{f' {source}' if source else ''}", found))
    return data


def config_hash(section: Any) -> str:
    """A stable short hash of a config section (e.g. the model section, stored in checkpoints)."""
    return hashlib.sha256(json.dumps(to_mapping(section), sort_keys=True).encode()).hexdigest()[:16]


_OVERRIDE_PATHS = (
    # (old dotted key, exact match only, new dotted key)
    ("standalone", False, "task"),
    ("trainer.num_subnets", True, "task.num_subnets"),
    ("trainer.sampler", True, "task.sampler.name"),
    ("trainer.attentive", False, "task.sampler"),
    ("trainer.teacher", True, "task.teacher.name"),
    ("trainer.voted", False, "task.teacher"),
    ("model.local", False, "model.sharing"),
)


def current_overrides(overrides: list[str], *, notes: list[str] | None = None) -> list[str]:
    """``--set KEY=VALUE`` flags with old keys rewritten to today's (``standalone.X`` also sets
    ``task.name=one_network`` first); each old key found adds one line to ``notes``."""
    result, found = [], []
    for text in overrides:
        key, sep, value = text.partition("=")
        key = key.strip()
        for old, exact, new in _OVERRIDE_PATHS:
            if key == old or (not exact and key.startswith(old + ".")):
                if old == "standalone":
                    result.append("task.name=one_network")
                found.append(old)
                key = new + key[len(old) :]
                break
        else:
            if key in SECTION_KEYS or key in PRECISION_FLAGS:
                found.append(key)
                if key in PRECISION_FLAGS:
                    on = str(value).strip().lower() in ("true", "yes", "on", "1")
                    key, value = "engine.precision", PRECISION_FLAGS[key] if on else "fp32"
                else:
                    key = SECTION_KEYS[key]
        result.append(f"{key}{sep}{value}")
    if notes is not None and found:
        notes.append(_note("--set", found))
    return result
