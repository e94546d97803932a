"""Shared fixtures. Tests run on CPU only; DeepSpeed is told so to keep its accelerator probe quiet."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_space():
    from models import load_search_space

    return load_search_space("tiny")


@pytest.fixture(scope="session")
def alphanet_space():
    from models import load_search_space

    return load_search_space("alphanet")


@pytest.fixture
def single_rank(monkeypatch):
    """Environment of a single in-process rank on the session's one process-group port."""
    from trainer_helpers import IN_PROCESS_ENV_KEYS, IN_PROCESS_PORT

    # setenv first so that teardown also removes what the Trainer exports (RANK, WORLD_SIZE, ...).
    for key in IN_PROCESS_ENV_KEYS:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("MASTER_PORT", str(IN_PROCESS_PORT))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The bundled digits as WebDataset shards (prepared once per session)."""
    from data_pipeline import prepare as prep

    out = tmp_path_factory.mktemp("digits_shards")
    prep.prepare("digits", out, ["webdataset"], shard_mb=1.0, quiet=True)
    return out
