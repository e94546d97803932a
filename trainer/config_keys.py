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

RENAMED: dict[str, str] = {
    "standalone": "task (name: one_network)",
    "trainer.num_subnets": "task.num_subnets",
    "trainer.sampler": "task.sampler.name",
    "trainer.attentive": "task.sampler",
    "trainer.teacher": "task.teacher.name",
    "trainer.voted": "task.teacher",
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
    if notes is not None:
        for key in found:
            notes.append(
                f"config{f' {source}' if source else ''}: '{key}' is now '{RENAMED[key]}' (the old key is read "
                f"until {REMOVED_IN}; see docs/architecture.md)"
            )
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
)


def current_overrides(overrides: list[str], *, notes: list[str] | None = None) -> list[str]:
    """``--set KEY=VALUE`` flags with old keys rewritten to today's (``standalone.X`` also sets
    ``task.name=one_network`` first); each old key found adds one line to ``notes``."""
    result = []
    for text in overrides:
        key, sep, value = text.partition("=")
        key = key.strip()
        for old, exact, new in _OVERRIDE_PATHS:
            if key == old or (not exact and key.startswith(old + ".")):
                if old == "standalone":
                    result.append("task.name=one_network")
                if notes is not None:
                    found = old if old in RENAMED else key
                    notes.append(f"--set {key}: '{found}' is now '{RENAMED[found]}' (read until {REMOVED_IN})")
                key = new + key[len(old) :]
                break
        result.append(f"{key}{sep}{value}")
    return result
