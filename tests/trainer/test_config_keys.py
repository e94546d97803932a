"""The one table of renamed config keys: old keys in a YAML file, in --set flags and in a run folder's resolved
config.yaml still resolve to today's config, each with a one-line note; choices not taken are dropped."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from trainer.config import load_config, model_hash
from trainer.config_keys import current_keys, current_overrides
from typedconfig import ConfigError

OLD_ATTENTIVE = """\
    model: {search_space: tiny, num_classes: 10}
    data: {base_resolution: 32}
    trainer:
      num_subnets: 5
      sampler: attentive
      attentive: {candidates: 2, choice: worst_up}
      teacher: inplace
      voted: {snapshots: 3}
"""


def write(tmp_path, text: str):
    path = tmp_path / "old.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_old_yaml_keys_resolve_with_one_note_each(tmp_path):
    notes: list[str] = []
    config = load_config(write(tmp_path, OLD_ATTENTIVE), notes=notes)
    task = config.task
    assert (task.name, task.num_subnets, task.sampler.name) == ("sandwich", 5, "attentive")
    assert (task.sampler.candidates, task.sampler.choice, task.teacher.name) == (2, "worst_up", "inplace")
    # the in-place teacher never read trainer.voted: dropped, not an unknown key of the in-place teacher
    assert not hasattr(task.teacher, "snapshots")
    assert len(notes) == 1 and "\n" not in notes[0]  # one line for the file
    assert "trainer.attentive -> task.sampler" in notes[0] and "trainer.num_subnets -> task.num_subnets" in notes[0]


def test_old_set_flags_resolve_and_win_over_the_file(repo):
    notes: list[str] = []
    old = ["trainer.teacher=voted", "trainer.voted.snapshots=2", "trainer.num_subnets=3"]
    config = load_config(repo / "configs/tiny_cpu.yaml", old, notes=notes)
    new = load_config(
        repo / "configs/tiny_cpu.yaml", ["task.teacher.name=voted", "task.teacher.snapshots=2", "task.num_subnets=3"]
    )
    assert config == new and config.task.teacher.snapshots == 2 and len(notes) == 1
    assert current_overrides(["standalone.label_weight=0.5", "seed=1"]) == [
        "task.name=one_network",
        "task.label_weight=0.5",
        "seed=1",
    ]


def test_a_run_folder_config_written_before_the_move_resumes_to_the_same_config(repo, tmp_path):
    """What 0.1 wrote into RUN/config.yaml: every section in full, the inactive subsections included."""
    today = load_config(repo / "configs/tiny_voted_cpu.yaml")
    mapping = yaml.safe_load((repo / "configs/tiny_voted_cpu.yaml").read_text())
    resolved = yaml.safe_load(yaml.safe_dump(_as_written_by_0_1(today)))
    assert "standalone" in resolved and resolved["trainer"]["voted"]["snapshots"] == 2
    assert current_keys(resolved)["task"]["teacher"]["name"] == mapping["task"]["teacher"]["name"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(resolved))
    assert load_config(path) == today and model_hash(load_config(path)) == model_hash(today)


def _as_written_by_0_1(config) -> dict:
    """Today's config in 0.1's resolved form (the keys before the move, defaults of the unused subsections)."""
    from typedconfig import to_mapping

    mapping = to_mapping(config)
    task = mapping.pop("task")
    teacher, sampler = task["teacher"], task["sampler"]
    mapping["trainer"] = {
        **mapping.pop("optimizer"),
        **{k: v for k, v in mapping.pop("engine").items() if k != "precision"},
        "bf16": config.engine.bf16,
        "bf16_autocast": config.engine.bf16_autocast,
        "checkpoint_every_steps": mapping["checkpoint"]["every_steps"],
        "keep_checkpoints": mapping.pop("checkpoint")["keep"],
        "eval_every_epochs": mapping["eval"]["every_epochs"],
        "calib_batches": mapping.pop("eval")["calib_batches"],
        "log_every_steps": mapping["log"]["every_steps"],
        "tensorboard": mapping.pop("log")["tensorboard"],
    }
    mapping["trainer"].update(
        num_subnets=task["num_subnets"],
        sampler=sampler.pop("name"),
        attentive={"candidates": 3, "choice": "best_up", "bucket_mflops": None, "max_trials": 100},
        teacher=teacher.pop("name"),
        voted=teacher,
    )
    mapping["standalone"] = None
    return mapping


def test_one_network_section_before_the_move(repo):
    old = current_keys({"standalone": {"student": {"arch": "largest"}}, "trainer": {"num_subnets": 4}})
    assert old["task"] == {"name": "one_network", "student": {"arch": "largest"}}
    assert "trainer" not in old  # num_subnets was its only key, and a one-network run never read it


def test_the_trainer_section_moves_to_its_sections_by_concern(repo):
    """0.1's one ``trainer:`` section: its keys land in optimizer, engine, checkpoint, eval and log; the two bf16
    booleans become ``engine.precision``; a key it never had is an error naming it."""
    moved = current_keys(
        {"trainer": {"epochs": 3, "zero_stage": 1, "bf16": True, "keep_checkpoints": 2, "calib_batches": 4}}
    )
    assert moved == {
        "optimizer": {"epochs": 3},
        "engine": {"zero_stage": 1, "precision": "bf16"},
        "checkpoint": {"keep": 2},
        "eval": {"calib_batches": 4},
    }
    with pytest.raises(ConfigError, match=r"trainer\.epoch\b"):
        current_keys({"trainer": {"epoch": 3}})
    assert current_overrides(["trainer.keep_checkpoints=1", "trainer.bf16=false"]) == [
        "checkpoint.keep=1",
        "engine.precision=fp32",
    ]


def test_contradicting_old_and_new_keys_are_an_error():
    with pytest.raises(ConfigError, match=r"trainer\.sampler"):
        current_keys({"trainer": {"sampler": "attentive"}, "task": {"sampler": {"name": "uniform"}}})


def test_naming_another_piece_on_the_command_line_drops_the_files_keys_for_the_old_one(repo):
    """The attentive recipe's sampler keys belong to the attentive sampler: choosing another sampler with --set
    leaves them behind instead of failing on them; keeping the same name keeps them."""
    recipe = repo / "configs/alphanet_kl_attentive_imagenet.yaml"
    other = load_config(recipe, ["task.sampler.name=uniform"]).task.sampler
    assert other.name == "uniform" and not hasattr(other, "candidates")
    same = load_config(recipe, ["task.sampler.name=attentive"]).task.sampler
    assert (same.name, same.candidates, same.bucket_mflops) == ("attentive", 3, 25.0)
    one = load_config(repo / "configs/tiny_cpu.yaml", ["task.name=one_network", "task.student.arch=largest"]).task
    assert one.name == "one_network" and one.student.arch == "largest"


def test_local_sharing_becomes_one_tagged_section_with_the_same_model_hash(repo):
    """0.1's ``model.sharing: local`` + ``model.local: {...}`` is ``model.sharing: {name: local, ...}``; the model
    hash (0.1's form of the section) is unchanged; ``model.local`` of a global run is dropped."""
    old = {"sharing": "local", "local": {"candidates": 3, "archs": 16}}
    moved = current_keys({"model": dict(old)})["model"]
    assert moved == {"sharing": {"name": "local", "candidates": 3, "archs": 16}}
    assert current_keys({"model": {"sharing": "global", "local": {"candidates": 3}}})["model"] == {"sharing": "global"}
    config = load_config(repo / "configs/tiny_cpu.yaml", ["model.sharing=local", "model.local.candidates=3"])
    assert config.model.sharing.name == "local" and config.model.sharing.candidates == 3
    identity = config.model.identity()
    assert identity["sharing"] == "local" and identity["local"]["candidates"] == 3 and "name" not in identity["local"]
    assert "sharing" not in load_config(repo / "configs/tiny_cpu.yaml").model.identity()
