"""The checkpoint fixtures' variants and records, shared by their writer and their replay.

``tests/fixtures/make_checkpoint_fixtures.py`` trains each :data:`VARIANTS` entry to step
:data:`CHECKPOINT_STEP`, keeps that run folder as ``tests/fixtures/checkpoints/<variant>/``, continues the run
to :data:`FINAL_STEP` and records the continuation (:func:`continuation_record`) in ``continuation.json``
there.  ``tests/trainer/test_checkpoint_fixtures.py`` resumes a copy of each folder with the current code and
compares its continuation with the recorded one.

Every path of a fixture run is relative to the run's working directory (:data:`RUN_DIR`, :data:`DATA_ROOT`):
``data.root`` is not one of the keys a resumed run may change freely (``trainer.run_folder.OPERATIONAL_KEYS``),
so an absolute data path in ``config.yaml`` would trip the "config changed" check on any other machine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trainer_helpers import overrides

from trainer.consolidate import consolidated_state_dict
from trainer.state.checkpoint import tag_for as tag

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints"
RECORD_NAME = "continuation.json"
CHECKPOINT_STEP = 2
"""K: the step of the fixture's committed checkpoint."""
FINAL_STEP = 4
"""K + M: the recorded continuation ends here."""
RUN_DIR = Path("run")
DATA_ROOT = Path("data/digits")
"""The bundled digits as WebDataset shards (tests/conftest.py ``digits_shards``), linked here from the run's
working directory."""

SHARED_SETTINGS = {
    # The recipes warm up from 0.001x the learning rate over 2 epochs; without warm-up the few recorded steps
    # move the weights well beyond float rounding, so the records tell a continued run from a stalled one.
    "trainer.warmup_epochs": 0,
    # One thread: the same float reductions whatever the machine's core count.
    "trainer.threads_per_rank": 1,
}
"""``--set`` overrides of every variant on top of ``trainer_helpers.overrides`` (batch 16, no workers, a
checkpoint every 2 steps, no TensorBoard, validation only at the end)."""

STEP_KEYS_SKIPPED = re.compile(r"^(step|time/.*|images_per_s)$")
"""Per-step metrics that are not recorded: the step itself, wall-clock timings and throughput."""


@dataclass(frozen=True)
class Variant:
    name: str
    recipe: str
    settings: dict[str, Any] = field(default_factory=dict)
    """``--set`` overrides of the recipe beyond :data:`SHARED_SETTINGS`."""
    why: str = ""


VARIANTS = (
    Variant("tiny_inplace_uniform", "configs/tiny_cpu.yaml", why="the tiny supernet: in-place teacher, uniform"),
    Variant(
        "tiny_voted",
        "configs/tiny_voted_cpu.yaml",
        # The recipe snapshots once an epoch after 2 epochs: here one snapshot at step 2 (in the checkpoint,
        # voting in steps 3-4), the second at step 4.
        {"trainer.voted.every_steps": 2, "trainer.voted.warmup_epochs": 0},
        why="voted teacher (inplace_and_voted) with a snapshot in the checkpoint",
    ),
    Variant(
        "tiny_attentive",
        "configs/tiny_cpu.yaml",
        {"trainer.sampler": "attentive"},
        why="attentive sampling (best_up of 3)",
    ),
    Variant("tiny_slim", "configs/tiny_slim_cpu.yaml", why="the slimmable MobileNetV2 recipe"),
    Variant(
        "tiny_local",
        "configs/tiny_local_cpu.yaml",
        # The recipe's schedule compressed (93 steps per epoch at batch 16 on one rank): 1 warm-up step, then
        # one layer decided per step (layer 0 at step 2, in the checkpoint; layers 1-2 in the continuation),
        # a meta-network update every 2 steps.
        {"model.local.warmup_epochs": 0.011, "model.local.epochs_per_layer": 0.011, "model.local.meta_every": 2},
        why="local weight sharing past its warm-up, one layer decided before the checkpoint",
    ),
    Variant(
        "tiny_standalone_largest",
        "configs/tiny_cpu.yaml",
        {"standalone.student.arch": "largest"},
        why="one network (the tiny space's largest, fresh), labels only",
    ),
)


def variant_overrides(variant: Variant, max_steps: int) -> list[str]:
    """The ``--set`` list of one fixture run (relative paths: run from the run's working directory)."""
    return overrides(RUN_DIR, DATA_ROOT, **SHARED_SETTINGS, **variant.settings, **{"trainer.max_steps": max_steps})


def step_values(run: Path, after: int) -> dict[str, dict[str, float]]:
    """``{step: {metric: value}}`` of the per-step records of ``run/metrics.jsonl`` after step ``after``."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        str(r["step"]): {k: v for k, v in r.items() if not STEP_KEYS_SKIPPED.match(k)}
        for r in records
        if "lr" in r and r["step"] > after
    }


def validation(run: Path, step: int) -> dict[str, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    found = [r for r in records if r["step"] == step and any(k.startswith("val/") for k in r)]
    return {k: v for k, v in found[-1].items() if k.startswith("val/")} if found else {}


def weight_summary(final: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per tensor of the consolidated state dict: ``numel``, ``sum`` and ``abs_sum`` of the final values,
    ``update_abs_sum`` (sum of |final - start|: what the continuation changed).  Computed in float64 so that the
    summary adds no rounding of its own."""
    summary = {}
    for key in sorted(final):
        value = final[key].detach().double()
        change = value - start[key].detach().double()
        summary[key] = {
            "numel": value.numel(),
            "sum": value.sum().item(),
            "abs_sum": value.abs().sum().item(),
            "update_abs_sum": change.abs().sum().item(),
        }
    return summary


def consolidated(run: Path, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(consolidated fp32 state dict, client state) of ``run``'s checkpoint at ``step``."""
    return consolidated_state_dict(run / "checkpoints", tag(step))


def continuation_record(run: Path) -> dict[str, Any]:
    """What the continuation from :data:`CHECKPOINT_STEP` to :data:`FINAL_STEP` of ``run`` produced."""
    start, start_client = consolidated(run, CHECKPOINT_STEP)
    final, client = consolidated(run, FINAL_STEP)
    return {
        "checkpoint_model_hash": start_client["model_hash"],
        "final_client_state": {k: v for k, v in client.items() if k != "search_space"},
        "steps": step_values(run, CHECKPOINT_STEP),
        "validation": validation(run, FINAL_STEP),
        "weights": weight_summary(final, start),
    }


def cpu_isa() -> str:
    """``avx512`` or ``avx2`` (from /proc/cpuinfo's flags), else ``other``: the float results of a replay on
    another instruction set may differ in the last bits."""
    try:
        flags = set(re.findall(r"\w+", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return "other"
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
