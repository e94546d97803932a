"""The search checks its config, its model table and every --export before it loads anything, from any folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import load_search_space
from typedconfig import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def search_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("search_run", REPO / "search/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_relative_paths_resolve_against_the_config_then_the_repository(tmp_path, monkeypatch, search_module):
    from search.config import SearchConfig

    monkeypatch.chdir(tmp_path)  # the shell's folder plays no part, except for --set values
    config = tmp_path / "mine" / "search.yaml"
    (tmp_path / "mine" / "tables").mkdir(parents=True)
    (tmp_path / "mine" / "tables" / "t.yaml").write_text("x")
    (tmp_path / "t2.yaml").write_text("x")

    def anchored(path: str, overrides=()) -> Path:
        search = SearchConfig(mark_models=Path(path))
        search_module.anchor_search_paths(search, config, list(overrides))
        return search.mark_models

    assert anchored("tables/t.yaml") == tmp_path / "mine" / "tables" / "t.yaml"
    assert anchored("configs/tiny_models.yaml") == REPO / "configs/tiny_models.yaml"
    assert anchored("t2.yaml", ["search.mark_models=t2.yaml"]) == tmp_path / "t2.yaml"
    with pytest.raises(ConfigError, match=r"search\.mark_models.*mine/nope\.yaml not found"):
        anchored("nope.yaml")


def test_export_specs_are_checked_against_the_marked_models(search_module):
    space = load_search_space("tiny")
    check = search_module.check_exports
    check(["tiny_m", "pareto@0.5"], space, REPO / "configs/tiny_models.yaml")
    with pytest.raises(ConfigError, match=r"--export tiny_xl: not a marked model of this search \(tiny_s, tiny_m"):
        check(["tiny_m", "tiny_xl"], space, REPO / "configs/tiny_models.yaml")
    with pytest.raises(ConfigError, match="--export pareto@abc: the budget must be a number of MFLOPs"):
        check(["pareto@abc"], space, None)
    with pytest.raises(ConfigError, match=r"none: set search\.mark_models"):
        check(["tiny_m"], space, None)
    # AlphaNet's models are not in the tiny space: none of them is exportable from a tiny supernet.
    with pytest.raises(ConfigError, match="a0"):
        check(["a0"], space, REPO / "configs/alphanet_models.yaml")


def test_main_refuses_a_bad_export_before_loading_from_another_folder(tmp_path, monkeypatch, capfd, search_module):
    from trainer.config import load_config, write_resolved

    run = tmp_path / "run"
    write_resolved(load_config(REPO / "configs/tiny_cpu.yaml"), run)  # a run folder without any weights
    monkeypatch.chdir(tmp_path)
    argv = ["--config", str(REPO / "configs/search_tiny_cpu.yaml"), "--run", str(run), "--export", "tiny_xl"]
    assert search_module.main(argv) == 2
    assert "--export tiny_xl: not a marked model" in capfd.readouterr().err
