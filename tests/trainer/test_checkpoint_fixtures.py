"""Checkpoints written by an earlier trainer still resume, and continue the way they did then.

``tests/fixtures/checkpoints/<variant>/`` holds run folders checkpointed at step 2 by the trainer of the day
they were written (``tests/fixtures/make_checkpoint_fixtures.py``; never rewritten), and
``continuation.json``: how that run continued to step 4.  Each test copies one folder to ``tmp_path``, resumes
it with the current code and the recorded command (one rank, ZeRO-0, the bundled digits), and checks:

- it resumed from step 2, not from scratch, and the only config change against the folder's ``config.yaml``
  is the operational ``optimizer.max_steps``;
- the model hash stored in the checkpoint is the one the current code computes for that config
  (``trainer.config.model_hash``);
- the continuation is the recorded one: every logged value of steps 3-4, the final validation, the client
  state of the final checkpoint (step, hash, local-sharing assignment: exactly), and per tensor of the final
  consolidated weights its size, sum, absolute sum and the absolute sum of its change since step 2.

Tolerance (``numpy.isclose``'s form): a logged value matches when |got - recorded| <= RTOL * |recorded| +
ATOL_LOGGED; a tensor's sum, absolute sum and change when |got - recorded| <= RTOL * scale + ATOL_ELEMENT *
numel, where scale is the recorded value (for a sum, which may cancel, the absolute sum); validation
top-1/top-5 may move by one image.  RTOL is 1e-4; ATOL_LOGGED 1e-6 (KD terms of nearly equal distributions
are 1e-4 to 1e-9); ATOL_ELEMENT 1e-6 (a recorded step changes the weights by ~1e-4 to 1e-3 per element).

A fixture may be replayed on a CPU with another instruction set (AVX2 vs AVX-512: ``written_on`` in the
record) whose kernels round differently, so bit-identity across machines is not promised.  With torch and
oneDNN held to AVX2 on the AVX-512 machine that wrote the fixtures (``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2``) the logged values moved by at most 9e-8 and the weights by at most 1e-7 per
element, about a tenth of the tolerance (relative to themselves, the residual blocks' last BatchNorm biases,
zero at initialisation and ~1e-9 after 4 steps, moved by tens of percent).  On the machine (and library
versions) that wrote a fixture the replay is bit-identical: the share of the tolerance used, printed, is 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from checkpoint_fixtures import (
    CHECKPOINT_STEP,
    DATA_ROOT,
    FINAL_STEP,
    FIXTURES,
    RECORD_NAME,
    RUN_DIR,
    VARIANTS,
    consolidated,
    continuation_record,
    cpu_isa,
    tag,
)
from trainer_helpers import run_in_process

from trainer.config import load_config, model_hash

RTOL = 1e-4
ATOL_LOGGED = 1e-6
ATOL_ELEMENT = 1e-6


def compare(got: dict, want: dict, problems: list[str]) -> float:
    """The largest share of its tolerance that a value of ``got`` uses (0: exactly the record ``want``); what is
    off the record goes to ``problems``."""
    worst = 0.0

    def check(name: str, value: float, recorded: float, scale: float, atol: float) -> None:
        nonlocal worst
        share = abs(value - recorded) / (RTOL * abs(scale) + atol)
        worst = max(worst, share)
        if share > 1:
            problems.append(f"{name}: {value!r}, recorded {recorded!r} ({share:.1f}x the tolerance)")

    if sorted(got["steps"]) != sorted(want["steps"]):
        problems.append(f"logged steps {sorted(got['steps'])}, recorded {sorted(want['steps'])}")
    for step, recorded in want["steps"].items():
        values = got["steps"].get(step, {})
        for key, value in recorded.items():
            if key not in values:
                problems.append(f"step {step}: {key} not logged")
            else:
                check(f"step {step} {key}", values[key], value, value, ATOL_LOGGED)
    if sorted(got["weights"]) != sorted(want["weights"]):
        problems.append(f"state dict keys differ: {sorted(set(got['weights']) ^ set(want['weights']))[:10]}")
    for key, recorded in want["weights"].items():
        summary = got["weights"].get(key)
        if summary is None:
            continue
        if summary["numel"] != recorded["numel"]:
            problems.append(f"{key}: {summary['numel']} elements, recorded {recorded['numel']}")
            continue
        atol = ATOL_ELEMENT * recorded["numel"]
        check(f"{key} sum", summary["sum"], recorded["sum"], recorded["abs_sum"], atol)
        check(f"{key} abs_sum", summary["abs_sum"], recorded["abs_sum"], recorded["abs_sum"], atol)
        update = recorded["update_abs_sum"]
        check(f"{key} update_abs_sum", summary["update_abs_sum"], update, update, atol)
    return worst


@pytest.fixture
def threads_kept():
    """The fixtures run on one torch thread; the tests after them get the process's count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def recipe_changes_undone(recipe: str) -> list[str]:
    """``--set`` overrides giving back the values a recipe had before its recorded deliberate changes
    (``tests/fixtures/recipes/changes.yaml``)."""
    changes = yaml.safe_load((FIXTURES.parent / "recipes" / "changes.yaml").read_text())
    return [f"{k}={v}" for change in changes if recipe in change["recipes"] for k, v in change["before"].items()]


@pytest.mark.parametrize("variant", [v.name for v in VARIANTS])
def test_a_fixture_checkpoint_resumes_and_continues_as_recorded(
    repo, digits_shards, tmp_path, single_rank, threads_kept, monkeypatch, variant
):
    fixture = FIXTURES / variant
    record = json.loads((fixture / RECORD_NAME).read_text())
    run = tmp_path / RUN_DIR
    shutil.copytree(fixture, run, ignore=shutil.ignore_patterns(RECORD_NAME))
    (tmp_path / DATA_ROOT).parent.mkdir(parents=True)
    (tmp_path / DATA_ROOT).symlink_to(digits_shards)
    monkeypatch.chdir(tmp_path)  # the run's paths are relative: run_dir=run, data.root=data/digits
    stored_hash = consolidated(run, CHECKPOINT_STEP)[1]["model_hash"]

    recipe, command = record["recipe"], record["continuation_overrides"]
    command = [*command, *recipe_changes_undone(Path(recipe).name)]  # the recipe as the fixture was written with
    trainer, results = run_in_process(repo, command, recipe=recipe)

    assert trainer.resumed_from == tag(CHECKPOINT_STEP) and results["global_step"] == FINAL_STEP
    assert trainer.config_changes == {"optimizer.max_steps": (CHECKPOINT_STEP, FINAL_STEP)}
    current_hash = model_hash(load_config(repo / recipe, command))
    assert stored_hash == record["checkpoint_model_hash"] == current_hash == trainer.model_hash

    got = json.loads(json.dumps(continuation_record(run)))  # as the record was stored (lists, not tuples)
    assert got["checkpoint_model_hash"] == record["checkpoint_model_hash"]
    assert got["final_client_state"] == record["final_client_state"]
    one_image = 100 / record["validation_images"] + 1e-9
    assert got["validation"].keys() == record["validation"].keys()
    for key, value in record["validation"].items():
        assert abs(got["validation"][key] - value) <= one_image, (key, got["validation"][key], value)
    problems: list[str] = []
    worst = compare(got, record, problems)
    machine = f"replayed on {cpu_isa()}, written on {record['written_on']['cpu']}"
    print(f"{variant}: {worst:.3g} of the tolerance used at most ({machine})")
    assert not problems, f"{len(problems)} value(s) off the record ({machine}):\n" + "\n".join(problems[:20])
