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
