"""Scores and weights are reused only for what produced them: the search's candidates carry an identity, the
consolidated weights their checkpoint tag."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from models import load_search_space
from search.candidates import CANDIDATES, IDENTITY, CandidateStore
from search.evolution import Candidate
from trainer.consolidate import WEIGHTS_NAME, ensure_weights, weights_tag, write_safetensors

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"


def scored(out: Path, identity: dict) -> None:
    record = Candidate(load_search_space("tiny").smallest(), 0.5, 0.1, 50.0, 90.0).to_record()
    out.mkdir(parents=True, exist_ok=True)
    (out / CANDIDATES).write_text(json.dumps(record) + "\n")
    (out / IDENTITY).write_text(json.dumps(identity))


def test_scores_of_other_weights_or_settings_are_set_aside(tmp_path):
    scored(tmp_path, {"weights": "step000000010", "val_batches": None})
    store = CandidateStore(tmp_path, 0, 1, {"weights": "step000000010", "val_batches": None})
    assert len(store) == 1 and store.note is None  # the same weights and settings: reused
    store = CandidateStore(tmp_path, 0, 1, {"weights": "step000000020", "val_batches": None})
    assert len(store) == 0 and "weights changed" in store.note
    assert (tmp_path / "candidates.stale-1.jsonl").is_file() and not (tmp_path / CANDIDATES).exists()
    assert json.loads((tmp_path / IDENTITY).read_text())["weights"] == "step000000020"
    scored(tmp_path, {"weights": "step000000020", "val_batches": None})
    store = CandidateStore(tmp_path, 0, 1, {"weights": "step000000020", "val_batches": 4})
    assert len(store) == 0 and "val_batches changed" in store.note
    assert (tmp_path / "candidates.stale-2.jsonl").is_file()


def test_scores_without_a_recorded_identity_are_not_trusted(tmp_path):
    scored(tmp_path, {})
    (tmp_path / IDENTITY).unlink()  # written by a version that recorded nothing
    store = CandidateStore(tmp_path, 0, 1, {"weights": "step000000002"})
    assert len(store) == 0 and "no identity.json" in store.note


def test_weights_consolidated_from_an_older_checkpoint_are_replaced(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "tiny_inplace_uniform", run)
    # Newer on disk than the checkpoint, but made from another one (by hand, `consolidate --tag`): the file time
    # said "fresh", the recorded tag does not.
    write_safetensors({"x": torch.zeros(1)}, run / WEIGHTS_NAME, {"tag": "step000000001"})
    assert ensure_weights(run, rank=0) == run / WEIGHTS_NAME
    assert weights_tag(run / WEIGHTS_NAME) == "step000000002"
