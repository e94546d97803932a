"""Shard writers: manifest, idempotence, atomicity, ImageFolder input, bundled digits."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import webdataset as wds
from data_helpers import make_image_folder

from data_pipeline import prepare as prep


def test_digits_webdataset_manifest_and_shards(tmp_path):
    out = tmp_path / "digits"
    manifest = prep.prepare("digits", out, ["webdataset"], shard_mb=0.2, quiet=True)
    assert manifest["classes"] == [str(i) for i in range(10)]
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["count"] + val["count"] == 1797 and val["count"] == 300
    assert sum(train["per_class"].values()) == train["count"]
    shards = train["webdataset"]["shards"]
    assert len(shards) > 1 and [s["name"] for s in shards] == [f"train-{i:06d}.tar" for i in range(len(shards))]
    assert sum(s["count"] for s in shards) == train["count"]
    for entry in shards:
        path = out / entry["name"]
        assert path.stat().st_size == entry["size"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    # The shards are ordinary WebDataset tars: the library itself reads them back.
    samples = list(wds.WebDataset([str(out / s["name"]) for s in shards], shardshuffle=False))
    assert len(samples) == train["count"]
    assert set(samples[0]) >= {"__key__", "jpg", "cls"} and int(samples[0]["cls"]) in range(10)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not list(out.glob(".tmp*"))


def test_rerun_is_a_no_op(tmp_path):
    out = tmp_path / "d"
    prep.prepare("digits", out, ["webdataset"], shard_mb=1.0, quiet=True)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline.prepare",
            "--source",
            "digits",
            "--out",
            str(out),
            "--formats",
            "webdataset",
            "--shard-mb",
            "1.0",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "nothing to do" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    out = tmp_path / "d"
    real = prep.write_webdataset

    def fail_on_val(samples, out_dir, split, *args):
        if split == "val":
            raise KeyboardInterrupt
        return real(samples, out_dir, split, *args)

    monkeypatch.setattr(prep, "write_webdataset", fail_on_val)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare("digits", out, ["webdataset"], shard_mb=1.0, quiet=True)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("val-*.tar"))
    monkeypatch.setattr(prep, "write_webdataset", real)
    manifest = prep.prepare("digits", out, ["webdataset"], shard_mb=1.0, quiet=True)  # a rerun completes it
    assert (out / "manifest.json").exists() and manifest["splits"]["val"]["count"] == 300


def test_image_folder_to_both_formats(tmp_path):
    root = make_image_folder(tmp_path / "folder", classes=3, per_class=6, corrupt=1)
    out = tmp_path / "out"
    manifest = prep.prepare(str(root), out, ["webdataset", "ffcv"], quiet=True)
    assert manifest["classes"] == ["class_0", "class_1", "class_2"]
    train = manifest["splits"]["train"]
    assert train["count"] == 3 * 6 + 1 and train["per_class"]["class_0"] == 7
    # The FFCV writer must decode, so the broken file is skipped there and recorded.
    assert train["ffcv"]["count"] == 18
    assert [s["key"] for s in train["ffcv_skipped"]] == ["train_class_0_broken0"]
    assert (out / "train.beton").stat().st_size == train["ffcv"]["size"]
    assert manifest["splits"]["val"]["count"] == 6


def test_bad_source_exits_2(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline.prepare",
            "--source",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "does not exist" in result.stderr
