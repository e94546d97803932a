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


def read_tar_samples(out, split="train") -> dict[str, int]:
    """key → label of every sample in the split's shards."""
    samples = {}
    for shard in sorted(out.glob(f"{split}-*.tar")):
        for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
            assert sample["__key__"] not in samples
            samples[sample["__key__"]] = int(sample["cls"])
    return samples


def test_sixteen_bit_png_keeps_its_brightness(tmp_path):
    import numpy as np
    from PIL import Image

    gray = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)  # 0 … 65,520
    path = tmp_path / "deep.png"
    Image.fromarray(gray).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(prep.Sample(key="k", label=0, path=path).load())
    expected = np.round(gray / 257.0)
    assert rgb.shape == (64, 64, 3) and np.abs(rgb[..., 0] - expected).max() <= 1
    assert 100 < rgb.mean() < 155  # PIL's own convert("RGB") clips: a mean near 255 (white)


def test_keys_stay_unique_when_names_collide(tmp_path):
    from data_helpers import jpeg_bytes

    root = tmp_path / "src"
    for label, name in enumerate(["x y", "x_y"]):
        (root / name).mkdir(parents=True)
        (root / name / "img.jpg").write_bytes(jpeg_bytes(label, (20, 20)))
    (root / "x_y" / "img.png").write_bytes(b"")  # same stem as img.jpg (and empty: skipped, recorded)
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 10, 10)).save(root / "x_y" / "img.webp")
    out = tmp_path / "out"
    manifest = prep.prepare(str(root), out, ["webdataset"], quiet=True)
    samples = read_tar_samples(out)
    assert sorted(samples.values()) == [0, 1, 1]  # 'x y'/img.jpg, 'x_y'/img.jpg and 'x_y'/img.webp: none merged
    skipped = manifest["splits"]["train"]["webdataset_skipped"]
    assert len(skipped) == 1 and skipped[0]["key"] not in samples and "Error" in skipped[0]["reason"]


def test_undecodable_and_bomb_images_are_skipped_without_leftovers(tmp_path, monkeypatch):
    from data_helpers import jpeg_bytes
    from PIL import Image

    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        (root / "a" / f"ok{i}.jpg").write_bytes(jpeg_bytes(i, (16, 16)))
    (root / "a" / "empty.png").write_bytes(b"")
    Image.new("L", (300, 300)).save(root / "a" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 300 × 300 is then more than twice the limit
    out = tmp_path / "out"
    manifest = prep.prepare(str(root), out, ["webdataset", "ffcv"], quiet=True)
    train = manifest["splits"]["train"]
    for listing in (train["webdataset_skipped"], train["ffcv_skipped"]):
        assert sorted(s["key"] for s in listing) == ["train_a_bomb", "train_a_empty"]
    assert "DecompressionBomb" in " ".join(s["reason"] for s in train["webdataset_skipped"])
    assert len(read_tar_samples(out)) == 3 and train["ffcv"]["count"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000000.tar", "train.beton"]


def test_symlinks_leaving_the_source_are_refused(tmp_path):
    from data_helpers import jpeg_bytes

    secret = tmp_path / "elsewhere" / "private.jpg"
    secret.parent.mkdir()
    secret.write_bytes(jpeg_bytes(1, (16, 16)))
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    (root / "a" / "ok.jpg").write_bytes(jpeg_bytes(2, (16, 16)))
    (root / "a" / "inside.jpg").symlink_to(root / "a" / "ok.jpg")  # inside the tree: fine
    (root / "a" / "leak.jpg").symlink_to(secret)
    manifest = prep.prepare(str(root), tmp_path / "out", ["webdataset"], quiet=True)
    assert sorted(read_tar_samples(tmp_path / "out")) == ["train_a_inside", "train_a_ok"]
    assert [r["path"] for r in manifest["refused"]] == ["a/leak.jpg"]


def test_a_source_without_images_exits_2_and_writes_nothing(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "notes.txt").write_text("no images here")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline.prepare",
            "--source",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "no images under" in result.stderr, result.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()
