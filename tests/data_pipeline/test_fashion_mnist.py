"""Fashion-MNIST source: the IDX reader on hand-made files (raw and gzipped), the per-class cut, the official split
as train/val, the error without the files; the real files (Debian's package or the shared copy) when present."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipeline import prepare as prep
from data_pipeline.idx import FASHION_MNIST_CLASSES, IMAGES_MAGIC, LABELS_MAGIC, load_fashion_mnist, read_idx

STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file written from the format's definition: big-endian magic and sizes, then the bytes."""
    magic = IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_set(folder: Path, counts: dict[str, int], gz: bool, seed: int = 0) -> dict[str, tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for split, n in counts.items():
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        rng.shuffle(labels)
        for stem, array in zip(STEMS[split], (images, labels), strict=True):
            data = idx_bytes(array)
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
        made[split] = (images, labels)
    return made


@pytest.mark.parametrize("gz", [False, True])
def test_reader_returns_the_written_arrays(tmp_path, gz):
    made = write_set(tmp_path, {"train": 30, "val": 20}, gz)
    loaded = load_fashion_mnist(tmp_path)
    for split in ("train", "val"):
        np.testing.assert_array_equal(loaded[split][0], made[split][0])
        np.testing.assert_array_equal(loaded[split][1], made[split][1])


def test_train_per_class_keeps_the_first_of_each_class_in_file_order(tmp_path):
    made = write_set(tmp_path, {"train": 50, "val": 20}, gz=True)
    images, labels = load_fashion_mnist(tmp_path, train_per_class=2)["train"]
    all_images, all_labels = made["train"]
    expected = sorted(i for c in range(10) for i in np.flatnonzero(all_labels == c)[:2])
    np.testing.assert_array_equal(labels, all_labels[expected])
    np.testing.assert_array_equal(images, all_images[expected])
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10
    assert len(load_fashion_mnist(tmp_path, train_per_class=2)["val"][1]) == 20  # the test split stays whole


def test_bad_files_are_refused_with_the_reason(tmp_path):
    (tmp_path / "x").write_bytes(struct.pack(">4I", 2049, 1, 28, 28))
    with pytest.raises(ValueError, match="magic 2049, expected 2051"):
        read_idx(tmp_path / "x", IMAGES_MAGIC)
    (tmp_path / "y").write_bytes(struct.pack(">4I", 2051, 2, 28, 28) + bytes(28 * 28))
    with pytest.raises(ValueError, match="holds 784"):
        read_idx(tmp_path / "y", IMAGES_MAGIC)


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "absent")
    assert prep.main(["--source", f"fashion-mnist:{tmp_path / 'absent'}", "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(ValueError, match="fashion-mnist only"):
        prep.prepare("digits", tmp_path / "o", ["webdataset"], quiet=True, train_per_class=3)


def test_prepare_writes_shards_that_decode_to_the_pixels(tmp_path):
    made = write_set(tmp_path / "idx", {"train": 40, "val": 10}, gz=True)
    out = tmp_path / "out"
    manifest = prep.prepare(f"fashion-mnist:{tmp_path / 'idx'}", out, ["webdataset"], quiet=True, train_per_class=3)
    assert manifest["classes"] == FASHION_MNIST_CLASSES
    assert manifest["splits"]["train"]["count"] == 30 and manifest["splits"]["val"]["count"] == 10
    assert manifest["options"]["train_per_class"] == 3
    shards = [str(out / s["name"]) for s in manifest["splits"]["val"]["webdataset"]["shards"]]
    samples = sorted(wds.WebDataset(shards, shardshuffle=False), key=lambda s: s["__key__"])
    images, labels = made["val"]
    for i, sample in enumerate(samples):
        assert int(sample["cls"]) == labels[i]
        pixels = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("L"), dtype=np.int16)
        # JPEG at quality 90 on noise: close, not exact; a wrong image or orientation is off by ~85 on average.
        assert np.abs(pixels - images[i]).mean() < 20
    # A different cut is a different dataset: the manifest no longer matches and it is written again.
    assert (
        prep.prepare(f"fashion-mnist:{tmp_path / 'idx'}", out, ["webdataset"], quiet=True, train_per_class=4)["splits"][
            "train"
        ]["count"]
        == 40
    )


REAL = [
    Path("/usr/share/datasets/fashion-mnist"),
    Path(__file__).resolve().parents[3] / "shared/datasets/fashion-mnist",
]


def test_the_real_files_when_present():
    folder = next((f for f in REAL if (f / "t10k-labels-idx1-ubyte.gz").is_file()), None)
    if folder is None:
        pytest.skip("Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist)")
    splits = load_fashion_mnist(folder, train_per_class=1000)
    assert splits["train"][0].shape == (10000, 28, 28) and splits["val"][0].shape == (10000, 28, 28)
    assert np.bincount(splits["val"][1], minlength=10).tolist() == [1000] * 10
