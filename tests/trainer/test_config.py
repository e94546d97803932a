"""Strict configs: unknown keys, wrong types and impossible values fail early and name key and file."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

import pytest
import yaml

from trainer.config import RunConfig, add_config_arguments, load_config, write_resolved
from typedconfig import ConfigError, apply_overrides, from_mapping


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_tiny_recipe_loads_with_defaults(repo):
    config = load_config(repo / "configs/tiny_cpu.yaml")
    assert config.model.search_space == "tiny"
    assert config.model.num_classes == 10
    assert config.loss.kd_loss == "adaptive_alpha"
    assert config.loss.clip == 5.0


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "bad.yaml", "model:\n  num_clases: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model.num_clases" in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_top_level_section(tmp_path):
    path = write(tmp_path, "bad.yaml", "modle: {}\n")
    with pytest.raises(ConfigError, match="'modle'"):
        load_config(path)


@pytest.mark.parametrize(
    "text, key",
    [
        ("model:\n  num_classes: ten\n", "model.num_classes"),
        ("model:\n  num_classes: 1.5\n", "model.num_classes"),
        ("model:\n  zero_init_residual_bn: 1\n", "model.zero_init_residual_bn"),
        ("loss:\n  kd_loss: alpha_beta\n", "loss.kd_loss"),
        ("seed: [1]\n", "seed"),
    ],
)
def test_wrong_types_are_rejected(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "bad.yaml", text))
    assert key in str(err.value)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("model:\n  dropout: 1.5\n", "model.dropout"),
        ("loss:\n  alpha_minus: 2.0\n", "alpha_minus"),
        ("loss:\n  clip: -1\n", "loss.clip"),
        ("model:\n  search_space: nonexistent_space\n", "model.search_space"),
    ],
)
def test_impossible_values_are_rejected(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "bad.yaml", text))
    assert fragment in str(err.value)


def test_search_space_resolution_must_divide_total_stride(tmp_path, repo):
    space = yaml.safe_load((repo / "configs/search_spaces/alphanet.yaml").read_text())
    space["resolutions"] = [192, 200]
    space_path = tmp_path / "space.yaml"
    space_path.write_text(yaml.safe_dump(space))
    run = write(tmp_path, "run.yaml", f"model:\n  search_space: {space_path}\n")
    with pytest.raises(ConfigError) as err:
        load_config(run)
    message = str(err.value)
    assert "[200]" in message and "32" in message and str(space_path) in message


def test_width_outside_space_in_model_table(tmp_path, repo):
    from models import load_named_archs

    table = yaml.safe_load((repo / "configs/alphanet_models.yaml").read_text())
    table["models"]["a0"]["widths"][1] = 20
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(table))
    with pytest.raises(ConfigError) as err:
        load_named_archs(path)
    message = str(err.value)
    assert "models.a0" in message and "mb1 width 20" in message and str(path) in message


def test_overrides_apply_after_file_and_are_typed(repo):
    config = load_config(
        repo / "configs/tiny_cpu.yaml", ["model.dropout=0.05", "loss.kd_loss=kl", "loss.clip=null", "seed=7"]
    )
    assert config.model.dropout == 0.05
    assert config.loss.kd_loss == "kl"
    assert config.loss.clip is None
    assert config.seed == 7
    with pytest.raises(ConfigError, match=r"model\.dropotu"):
        load_config(repo / "configs/tiny_cpu.yaml", ["model.dropotu=0.1"])


def test_apply_overrides_creates_sections_and_rejects_bad_syntax():
    assert apply_overrides({}, ["a.b.c=3"]) == {"a": {"b": {"c": 3}}}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["no_equals_sign"])
    with pytest.raises(ConfigError):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_repeated_set_flags_all_apply_in_order(repo):
    """``--set a=1 --set b=2`` applies both (argparse's plain ``nargs="+"`` kept only the last flag), and a key
    given twice takes its last value; the same parser builds both entry points' ``--set``."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(
        [
            "--config",
            "configs/tiny_cpu.yaml",
            "--set",
            "optimizer.max_steps=10",
            "seed=4",
            "--set",
            "run_dir=/tmp/x",
            "--set",
            "seed=5",
        ]
    )
    assert args.overrides == ["optimizer.max_steps=10", "seed=4", "run_dir=/tmp/x", "seed=5"]
    config = load_config(repo / args.config, args.overrides)
    assert (config.optimizer.max_steps, str(config.run_dir), config.seed) == (10, "/tmp/x", 5)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.config",
            "--config",
            "configs/tiny_cpu.yaml",
            "--set",
            "optimizer.max_steps=10",
            "--set",
            "run_dir=/tmp/x",
        ],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert (resolved["optimizer"]["max_steps"], resolved["run_dir"]) == (10, "/tmp/x")


def test_resolved_config_is_written_and_reloads_equal(tmp_path, repo):
    config = load_config(repo / "configs/tiny_cpu.yaml", ["model.dropout=0.15"])
    path = write_resolved(config, tmp_path / "run")
    assert path.name == "config.yaml"
    assert load_config(path) == config
    # Every field is present, defaults included.
    data = yaml.safe_load(path.read_text())
    assert data["model"]["drop_connect_stages"] == 2
    assert from_mapping(RunConfig, data) == config


def test_config_cli_exit_codes(tmp_path, repo):
    ok = subprocess.run(
        [sys.executable, "-m", "trainer.config", "--config", "configs/tiny_cpu.yaml", "--set", "seed=3"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["seed"] == 3
    bad = write(tmp_path, "bad.yaml", "model:\n  widths: [1]\n")
    fail = subprocess.run(
        [sys.executable, "-m", "trainer.config", "--config", str(bad)], cwd=repo, capture_output=True, text=True
    )
    assert fail.returncode == 2
    assert "model.widths" in fail.stderr and str(bad) in fail.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "trainer.config", "--config", str(tmp_path / "nope.yaml")],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "file not found" in missing.stderr


def test_both_entry_points_print_their_resolved_config_on_request(tmp_path, repo):
    """``--print-config`` prints what would run (every default, absolute paths) and starts nothing."""
    train = [sys.executable, str(repo / "trainer/run.py"), "--config", str(repo / "configs/tiny_cpu.yaml")]
    train += ["--print-config", "--set", "seed=4", "run_dir=here"]
    printed = subprocess.run(train, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr[-2000:]
    resolved = yaml.safe_load(printed.stdout)
    assert resolved["seed"] == 4 and resolved["run_dir"] == str(tmp_path / "here")
    assert resolved["optimizer"]["lr_per_256"] == load_config(repo / "configs/tiny_cpu.yaml").optimizer.lr_per_256
    search = [sys.executable, str(repo / "search/run.py"), "--config", str(repo / "configs/search_tiny_cpu.yaml")]
    search += ["--run", "no-run-yet", "--print-config", "--set", "search.iterations=3"]
    printed = subprocess.run(search, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr[-2000:]
    resolved = yaml.safe_load(printed.stdout)["search"]
    assert resolved["iterations"] == 3 and resolved["mark_models"] == str(repo / "configs/tiny_models.yaml")
    assert list(tmp_path.iterdir()) == []  # nothing made


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "alphanet_imagenet.yaml"])
def test_shipped_recipes_are_valid(repo, name):
    config = load_config(repo / "configs" / name)
    assert config.task.num_subnets == 4 and config.loss.kd_loss == "adaptive_alpha"


def test_imagenet_recipe_is_the_papers(repo):
    c = load_config(repo / "configs/alphanet_imagenet.yaml")
    assert (c.optimizer.epochs, c.optimizer.lr_per_256, c.optimizer.warmup_epochs, c.optimizer.weight_decay) == (
        360,
        0.1,
        5.0,
        1e-5,
    )
    assert (c.optimizer.grad_clip_value, c.loss.clip, c.loss.alpha_minus, c.loss.alpha_plus) == (1.0, 5.0, -1.0, 1.0)
    assert (c.model.dropout, c.model.drop_connect, c.loss.label_smoothing, c.data.auto_augment) == (0.2, 0.2, 0.1, "v0")
    assert c.data.batch_size == 32 and c.model.search_space == "alphanet"
