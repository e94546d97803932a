"""Relative paths of a config point at the config file's folder or the repository, never the shell's folder;
command-line values are the shell's (trainer/paths.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from trainer_helpers import child_env

from trainer.config import load_config, write_resolved
from trainer.paths import REPO
from trainer.run_folder import check_config_change


def own_config(folder: Path, **keys) -> Path:
    """A user's config outside the repository: the tiny recipe with ``keys`` (dotted) set in the file."""
    data = yaml.safe_load((REPO / "configs/tiny_cpu.yaml").read_text())
    for dotted, value in keys.items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_recipe_of_the_repository_means_the_same_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(REPO / "configs/tiny_distill_cpu.yaml")
    assert config.run_dir == REPO / "runs/tiny_distill_cpu"
    assert config.data.root == REPO / "data/digits"
    assert config.task.teacher.run == REPO / "runs/tiny_cpu"
    assert config.task.student.arch == f"{REPO / 'configs/tiny_models.yaml'}:tiny_s"


def test_a_config_outside_the_repository_reads_beside_itself_then_the_repository(tmp_path, monkeypatch):
    (tmp_path / "exp/my_data").mkdir(parents=True)
    path = own_config(tmp_path / "exp", **{"data.root": "my_data", "run_dir": "runs/mine"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path)
    assert config.data.root == tmp_path / "exp/my_data"  # found beside the config
    assert config.run_dir == tmp_path / "exp/runs/mine"  # what the run makes: beside the config
    copied = load_config(own_config(tmp_path / "copy", **{"data.root": "configs"}))
    assert copied.data.root == REPO / "configs"  # not beside it, but in the repository


def test_command_line_values_are_paths_of_the_shell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(REPO / "configs/tiny_cpu.yaml", ["run_dir=out/run", "data.root=../d"])
    assert config.run_dir == tmp_path / "out/run"
    assert config.data.root == tmp_path.parent / "d"  # '..' folded


def test_a_run_recorded_with_relative_paths_resumes_without_a_change(tmp_path, monkeypatch):
    """Run folders written before paths were stored absolute hold them relative to the shell's folder of the
    time: resumed from that folder (here the repository root, as the README said), nothing changed."""
    run = tmp_path / "run"
    config = load_config(REPO / "configs/tiny_distill_cpu.yaml", [f"run_dir={run}"])
    recorded = write_resolved(config)
    data = yaml.safe_load(recorded.read_text())
    data["data"]["root"], data["task"]["teacher"]["run"] = "data/digits", "runs/tiny_cpu"
    data["task"]["student"]["arch"] = "configs/tiny_models.yaml:tiny_s"
    recorded.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(REPO)
    assert check_config_change(config, run, allow=False) == {}
    monkeypatch.chdir(tmp_path)  # from another folder the same relative paths meant other files
    assert set(check_config_change(config, run, allow=True)) == {"data.root", "task.teacher.run", "task.student.arch"}


def test_the_entry_point_from_another_folder_writes_nothing_into_the_shells_folder(tmp_path, digits_shards):
    """``python /repo/trainer/run.py --config ~/exp/mine.yaml`` from a third folder: the run folder lies beside
    the config, the recorded config holds absolute paths, and nothing lands in the shell's folder."""
    config = own_config(tmp_path / "exp", **{"data.root": str(digits_shards), "run_dir": "runs/mine"})
    shell = tmp_path / "shell"
    shell.mkdir()
    command = [sys.executable, str(REPO / "trainer/run.py"), "--config", str(config), "--set", "optimizer.max_steps=1"]
    command += ["data.num_workers=0", "eval.every_epochs=0", "log.tensorboard=false"]
    result = subprocess.run(command, cwd=shell, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = yaml.safe_load((tmp_path / "exp/runs/mine/config.yaml").read_text())
    assert recorded["run_dir"] == str(tmp_path / "exp/runs/mine")
    assert recorded["data"]["root"] == str(digits_shards)
    assert list(shell.iterdir()) == []
