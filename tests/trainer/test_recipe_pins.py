"""Every training recipe of configs/ resolves as it did when it was pinned, with the same model hash.

``tests/fixtures/recipes/`` (``tests/fixtures/make_recipe_pins.py``, never rewritten) holds each recipe's
resolved config as a run writes it into its folder, and ``pins.json`` its model hash (what checkpoints store
and a resume checks) and the YAML files of configs/ that are not training recipes.  A recipe here resolves
without its data or teacher files: ``load_config`` validates, it opens no data.

Once the config is reorganised, a pin is compared through the translation of old keys, not rewritten: the
point is that today's recipes and today's run folders mean the same thing to tomorrow's code.  A deliberate
change of a recipe is listed, with its reason, in ``tests/fixtures/recipes/changes.yaml`` and applied to the pin.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from trainer.config import RunConfig, config_to_yaml, load_config, model_hash
from trainer.config_keys import current_keys
from trainer.paths import recorded_anchor
from typedconfig import ConfigError, from_mapping
from typedconfig.paths import anchor_paths

PINS = Path(__file__).resolve().parents[1] / "fixtures" / "recipes"
INDEX = json.loads((PINS / "pins.json").read_text())
CHANGES = yaml.safe_load((PINS / "changes.yaml").read_text())
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(autouse=True)
def in_the_checkout(repo, monkeypatch):
    monkeypatch.chdir(repo)  # recipes name files relative to the checkout, as they were pinned


def test_every_yaml_of_configs_is_a_pinned_recipe_or_known_not_to_be_one():
    present = {p.name for p in CONFIGS.glob("*.yaml")}
    known = set(INDEX["recipes"]) | set(INDEX["not_recipes"])
    assert present - known == set(), "a new config: run tests/fixtures/make_recipe_pins.py to pin it"
    assert known - present == set(), "a pinned config is gone from configs/"


@pytest.mark.parametrize("name", sorted(INDEX["not_recipes"]))
def test_what_was_not_a_training_recipe_still_is_not(name):
    with pytest.raises(ConfigError):
        load_config(Path("configs") / name)


@pytest.mark.parametrize("name", sorted(INDEX["recipes"]))
def test_a_recipe_resolves_to_its_pin_with_the_same_model_hash(name):
    config = load_config(Path("configs") / name)
    pinned = current_keys(yaml.safe_load((PINS / name).read_text()))  # pinned before the task section existed
    for change in CHANGES:
        if name in change["recipes"]:
            for key, value in change["set"].items():
                section, leaf = key.split(".")
                pinned[section][leaf] = value
    expected = from_mapping(RunConfig, pinned)
    anchor_paths(expected, recorded_anchor)  # pinned with paths relative to the checkout (the test's folder)
    assert yaml.safe_load(config_to_yaml(config)) == yaml.safe_load(config_to_yaml(expected))
    assert model_hash(config) == INDEX["recipes"][name]["model_hash"]

    # The pin read back as a run folder's config.yaml is read on resume: the same config (but for the deliberate
    # changes), the same hash.
    reloaded = load_config(PINS / name)
    changed = [key for change in CHANGES if name in change["recipes"] for key in change["set"]]
    assert load_config(PINS / name, [f"{key}={_get(config, key)}" for key in changed]) == config
    assert model_hash(reloaded) == INDEX["recipes"][name]["model_hash"]


def _get(config, key: str):
    section, leaf = key.split(".")
    return getattr(getattr(config, section), leaf)


def test_every_change_names_pinned_recipes_and_keys_that_exist():
    for change in CHANGES:
        assert change["why"] and set(change["recipes"]) <= set(INDEX["recipes"])
        for recipe in change["recipes"]:
            config = load_config(Path("configs") / recipe)
            assert all(_get(config, key) == value for key, value in change["set"].items())
