"""bench.payoff: the plan (one run per distinct resolved config, seeds per budget), the summary and the goals it
prints; end to end on the bundled digits in CI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from bench import payoff
from bench.common import REPO


def args_for(tmp_path: Path, config: Path, **over) -> argparse.Namespace:
    values = {
        "config": config,
        "models": REPO / "configs/tiny_models.yaml",
        "mid": "tiny_m",
        "budgets": [2, 4],
        "seeds": 2,
        "single_seed_from": 4,
        "methods": ["recipe", "adaptive", "none"],
        "batch_size": 64,
        "set": [],
        "out": tmp_path / "out",
        **over,
    }
    return argparse.Namespace(**values)


def adaptive_recipe(tmp_path: Path) -> Path:
    """The tiny recipe with AlphaNet's KD written out, so that ``recipe`` and ``adaptive`` train the same."""
    recipe = yaml.safe_load((REPO / "configs/tiny_cpu.yaml").read_text())
    recipe["loss"].update(kd_loss="adaptive_alpha", kd_warmup_epochs=0, kd_label_mix=0.0, kd_gate="none")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_plan_shares_runs_of_one_config_and_cuts_seeds_at_long_budgets(tmp_path):
    plan = payoff.Plan(args_for(tmp_path, adaptive_recipe(tmp_path)), tmp_path / "data")
    seeds = {(what[2], what[3]) for what in plan.runs}
    assert seeds == {(2, 0), (2, 1), (4, 0)}
    for epochs, seed in seeds:
        recipe, adaptive, none = (plan.runs[("supernet", m, epochs, seed)][0] for m in ("recipe", "adaptive", "none"))
        assert recipe == adaptive and none != adaptive
        alone = {plan.runs[("alone", n, epochs, seed)][0] for n in payoff.ALONE}
        assert len(alone) == 3 and adaptive not in alone
    overrides = plan.runs[("alone", "mid", 2, 1)][1]
    assert "task.name=one_network" in overrides and any(o.endswith("tiny_models.yaml:tiny_m") for o in overrides)
    assert "seed=1" in overrides and "optimizer.epochs=2" in overrides and "data.batch_size=64" in overrides


def test_cached_runs_are_found_by_their_recorded_config_whatever_their_folder(tmp_path):
    """A run written under an earlier key (another folder name), or before a config field with a default was
    added (absent from its config.yaml), is the same run."""
    from trainer.config import load_config, write_resolved

    args = args_for(tmp_path, adaptive_recipe(tmp_path))
    planned = payoff.Plan(args, tmp_path / "data")
    run_dir, overrides = planned.runs[("supernet", "none", 2, 1)]
    old = tmp_path / "out/runs/supernet_e2_s1_0123456789"
    recorded = yaml.safe_load(write_resolved(load_config(args.config, overrides), old).read_text())
    del recorded["data"]["max_image_pixels"]  # as a run written before that field existed
    (old / "config.yaml").write_text(yaml.safe_dump(recorded))
    (old / "supernet.safetensors").write_bytes(b"")
    again = payoff.Plan(args, tmp_path / "data")
    assert again.runs[("supernet", "none", 2, 1)][0] == old != run_dir
    assert again.runs[("supernet", "none", 2, 0)][0] == planned.runs[("supernet", "none", 2, 0)][0]  # another seed


def test_warmup_methods_take_half_the_budget():
    assert "loss.kd_warmup_epochs=12.0" in payoff.method_overrides("adaptive+warmup", 24)
    assert "loss.kd_warmup_epochs=3.0" in payoff.method_overrides("kl+warmup", 6)


def result(kind, name, epochs, seed, **top1):
    return {"kind": kind, "name": name, "epochs": epochs, "seed": seed, "top1": top1}


def test_summary_and_goals():
    results = []
    for seed, shift in ((0, -0.5), (1, 0.5)):
        for epochs in (6, 12):
            results.append(result("supernet", "recipe", epochs, seed, largest=80 + shift, mid=75, smallest=70))
            results.append(result("supernet", "none", epochs, seed, largest=81, mid=74, smallest=70 - epochs / 6))
            for net, value in (("largest", 81.5), ("mid", 76.0), ("smallest", 70.5)):
                results.append(result("alone", net, epochs, seed, **{net: value}))
    summary = payoff.summarise(results)
    mean, std, n = summary[12]["recipe"]["largest"]
    assert (mean, n) == (80.0, 2) and std == pytest.approx(2**0.5 / 2)
    lines = payoff.goals(summary, ["recipe", "none"])
    assert lines[0] == "12 epochs, largest: recipe -1.50 vs alone (goal: within 1.0): NOT met by 0.50 points"
    assert lines[1].endswith("smallest: recipe -0.50 vs alone (goal: within 1.0): met")
    assert lines[2].startswith("6 epochs, recipe's KD vs no KD: largest -1.00") and lines[2].endswith("NOT met")


@pytest.mark.slow
def test_end_to_end_on_digits(tmp_path):
    """Two supernets and three stand-alone networks, one epoch each; a rerun trains nothing and prints the same."""
    recipe = yaml.safe_load((REPO / "configs/tiny_cpu.yaml").read_text())
    recipe["data"]["num_workers"] = 0
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    argv = ["--config", str(config), "--data", str(_digits()), "--budgets", "1", "--seeds", "1"]
    argv += ["--methods", "recipe", "none", "--calib-batches", "2", "--out", str(tmp_path / "out")]
    payoff.main(argv)
    record = json.loads((tmp_path / "out/payoff.json").read_text())
    assert {(r["kind"], r["name"]) for r in record["runs"]} == {
        ("supernet", "recipe"),
        ("supernet", "none"),
        ("alone", "largest"),
        ("alone", "mid"),
        ("alone", "smallest"),
    }
    for r in record["runs"]:
        assert all(0 <= v <= 100 for v in r["top1"].values())
    assert (tmp_path / "out/payoff.png").stat().st_size > 0
    runs = sorted((tmp_path / "out/runs").iterdir())
    stamps = [p.stat().st_mtime_ns for p in runs]
    payoff.main(argv)
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "out/runs").iterdir())] == stamps
    assert json.loads((tmp_path / "out/payoff.json").read_text())["summary"] == record["summary"]


def _digits() -> Path:
    from bench.common import prepared_data

    return prepared_data(None)
