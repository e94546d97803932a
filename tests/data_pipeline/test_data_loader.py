"""Loaders: shares per rank, determinism, exact mid-epoch resume, bad input, rescale."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_helpers import all_batches, config, rewrite_tar
from torchvision.transforms.v2 import functional as TF
from trainer_helpers import child_env

from data_pipeline import DataConfig, DataError, build_loader, normalize, rescale
from data_pipeline import prepare as prep
from data_pipeline.plan import EpochPlan

FORMATS = ["webdataset", "ffcv"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    prep.prepare("digits", out, ["webdataset", "ffcv"], shard_mb=0.25, quiet=True)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_batches_are_uint8_nchw_at_base_resolution(digits, fmt):
    loader = build_loader(config(digits, fmt, base_resolution=24), "train", train=True, seed=0)
    batch = next(iter(loader))
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (16, 3, 24, 24)
    assert batch.labels.dtype == torch.int64 and batch.valid.all()
    assert batch.images.float().std() > 10  # real pixels, not a constant


def test_rank_shares_are_disjoint_equal_and_seeded():
    n, world = 1497, 2
    plans = [
        EpochPlan(num_samples=n, batch_size=16, rank=r, world_size=world, seed=3, train=True) for r in range(world)
    ]
    shares = [p.rank_indices(epoch=0)[0] for p in plans]
    assert len(shares[0]) == len(shares[1]) == n // world
    assert not set(shares[0]) & set(shares[1])
    assert plans[0].num_batches == plans[1].num_batches == (n // world) // 16
    np.testing.assert_array_equal(plans[0].rank_indices(0)[0], shares[0])  # a function of (seed, epoch)
    assert not np.array_equal(plans[0].rank_indices(1)[0], shares[0])
    other_seed = EpochPlan(num_samples=n, batch_size=16, rank=0, world_size=world, seed=4, train=True)
    assert not np.array_equal(other_seed.rank_indices(0)[0], shares[0])


def test_eval_shares_cover_every_sample_once_with_equal_batch_counts():
    n, world = 301, 2
    plans = [
        EpochPlan(num_samples=n, batch_size=50, rank=r, world_size=world, seed=0, train=False) for r in range(world)
    ]
    assert plans[0].num_batches == plans[1].num_batches == 4
    seen = []
    for p in plans:
        idx, valid = p.rank_indices(0)
        seen += list(idx[valid])
    assert sorted(seen) == list(range(n))


def digests(loader) -> Counter:
    """How often each image (by content) came out of ``loader`` in one epoch."""
    return Counter(hashlib.sha256(image.numpy().tobytes()).hexdigest() for b in loader for image in b.images)


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_ranks_see_disjoint_shares(digits, fmt):
    # Crops of the whole image and no flips: each image that comes out identifies its sample.
    cfg = config(digits, fmt, crop_scale=(1.0, 1.0), hflip=False, eval_resize=32)
    everything = digests(build_loader(cfg, "train", train=False))
    assert sum(everything.values()) == 1497
    loaders = [build_loader(cfg, "train", train=True, rank=r, world_size=2, seed=5) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == (1497 // 2) // 16
    shares = [digests(loader) for loader in loaders]
    assert sum(shares[0].values()) == sum(shares[1].values()) == len(loaders[0]) * 16
    # Together no more copies of any image than the dataset holds: no sample on both ranks (or twice).
    assert shares[0] + shares[1] <= everything


@pytest.mark.parametrize("fmt", FORMATS)
def test_mid_epoch_resume_gives_exactly_the_next_batches(digits, fmt):
    cfg = config(digits, fmt)
    reference = build_loader(cfg, "train", train=True, rank=1, world_size=2, seed=7)
    epoch0 = all_batches(reference)
    epoch1 = all_batches(reference)
    assert not torch.equal(epoch0[0][0], epoch1[0][0])  # augmentation and order change per epoch

    interrupted = build_loader(cfg, "train", train=True, rank=1, world_size=2, seed=7)
    it = iter(interrupted)
    for _ in range(5):
        next(it)
    state = interrupted.state_dict()
    assert state["epoch"] == 0 and state["position"] == 5
    del it, interrupted

    resumed = build_loader(cfg, "train", train=True, rank=1, world_size=2, seed=7)
    resumed.load_state_dict(state)
    rest = all_batches(resumed)
    assert len(rest) == len(epoch0) - 5
    for (img, lab), (ref_img, ref_lab) in zip(rest, epoch0[5:]):
        assert torch.equal(lab, ref_lab) and torch.equal(img, ref_img)
    # ... and the following epoch continues identically too.
    nxt = all_batches(resumed)
    assert len(nxt) == len(epoch1) > 0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(nxt, epoch1))


def test_resume_state_is_checked(digits):
    cfg = config(digits, "webdataset")
    loader = build_loader(cfg, "train", train=True, rank=0, world_size=2, seed=0)
    state = loader.state_dict()
    other = build_loader(cfg, "train", train=True, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="world_size"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict({**state, "version": 99})


@pytest.mark.parametrize("fmt", FORMATS)
def test_eval_is_deterministic_and_centre_cropped(digits, fmt):
    cfg = config(digits, fmt, eval_resize=32)
    a = all_batches(build_loader(cfg, "val", train=False))
    b = all_batches(build_loader(cfg, "val", train=False))
    assert sum(len(lab) for _, lab in a) == 300 and len(a) == len(b)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))


def test_both_formats_yield_the_same_labels_in_the_same_order(digits):
    labels = {
        fmt: torch.cat([lab for _, lab in all_batches(build_loader(config(digits, fmt), "train", train=True, seed=2))])
        for fmt in FORMATS
    }
    assert torch.equal(labels["webdataset"], labels["ffcv"])


@pytest.fixture
def damaged(tmp_path, digits) -> Path:
    """A copy of the digits train shards with one corrupt JPEG, one sample without label and a truncated shard."""
    root = tmp_path / "damaged"
    root.mkdir()
    shards = sorted(digits.glob("train-*.tar"))
    for i, shard in enumerate(shards):
        if i == 0:
            rewrite_tar(
                shard, root / shard.name, lambda name, data: b"\xff\xd8garbage" if name == "train00003.jpg" else data
            )
        elif i == 1:
            with tarfile.open(shard) as tar:
                first = tar.getnames()[0].split(".")[0]
            rewrite_tar(
                shard, root / shard.name, lambda name, data, first=first: None if name == f"{first}.cls" else data
            )
        else:
            (root / shard.name).write_bytes(shard.read_bytes())
    last = root / shards[-1].name
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2 + 100])  # cut mid-member
    return root


def test_bad_webdataset_input_is_skipped_counted_and_reported(damaged, digits, caplog):
    loader = build_loader(config(damaged, "webdataset", batch_size=8), "train", train=True, seed=0)
    full = build_loader(config(digits, "webdataset", batch_size=8), "train", train=True, seed=0)
    assert 0 < full.num_samples - loader.num_samples < 1497 // 10  # lost: one label + the truncated tail
    images = sum(len(b) for b in loader)  # the epoch runs to its end
    summary = loader.last_summary
    assert summary.batches == len(loader)
    assert images == len(loader) * 8 - len(summary.skipped)
    assert [(s[0], s[1]) for s in summary.skipped] == [("train-000000.tar", "train00003")]
    text = summary.text()
    assert "train-000000.tar/train00003" in text and "no label" in text and "truncated" in text
    assert "train00003" in caplog.text


def test_missing_data_is_a_clear_error_at_start(tmp_path, digits):
    with pytest.raises(DataError, match=r"manifest\.json not found"):
        build_loader(config(tmp_path / "nothing", "ffcv"), "train", train=True)
    with pytest.raises(DataError, match=r"no shards match.*does not exist; prepare a dataset"):
        build_loader(config(tmp_path / "nothing", "webdataset"), "train", train=True)
    images = tmp_path / "my_images"
    (images / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"ImageFolder tree.*prepare --source .*my_images --out data/my_images"):
        build_loader(config(images, "webdataset"), "train", train=True)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.json").write_text((digits / "manifest.json").read_text())
    with pytest.raises(DataError, match="missing data file"):
        build_loader(config(copy, "webdataset"), "train", train=True)
    with pytest.raises(DataError, match="missing data file"):
        build_loader(config(copy, "ffcv"), "train", train=True)
    with pytest.raises(DataError, match="split 'test'"):
        build_loader(config(digits, "webdataset", train_split="test"), "test", train=True)


def test_imagefolder_jpegs_of_mixed_sizes_load_in_both_formats(tmp_path):
    from data_helpers import make_image_folder

    root = make_image_folder(tmp_path / "f", classes=2, per_class=9, corrupt=1)
    out = tmp_path / "o"
    prep.prepare(str(root), out, ["webdataset", "ffcv"], quiet=True)
    for fmt in FORMATS:
        loader = build_loader(config(out, fmt, batch_size=4, base_resolution=16), "train", train=True)
        batches = list(loader)
        assert all(b.images.shape[1:] == (3, 16, 16) for b in batches)
    # The broken JPEG reached the tar (bytes are stored as they are) and is skipped at load time.
    wds_loader = build_loader(config(out, "webdataset", batch_size=19, base_resolution=16), "train", train=True)
    list(wds_loader)
    assert [s[1] for s in wds_loader.last_summary.skipped] == ["train_class_0_broken0"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_hostile_jpeg_headers_are_skipped_at_prepare_and_by_the_loader(tmp_path, fmt):
    """JPEGs of a few hundred bytes declaring 20000×20000 and 65500×65500 pixels: ``prepare`` skips them,
    naming the file; shards written with a higher bound hold them, and the loader skips them without decoding
    (before, the first was decoded at 2.3 GB and the second escaped as "you tried to allocate 5327047971
    bytes")."""
    import resource

    from data_helpers import hostile_jpeg, make_image_folder

    root = make_image_folder(tmp_path / "f", classes=2, per_class=3)
    for split in ("train", "val"):
        (root / split / "class_0" / "huge.jpg").write_bytes(hostile_jpeg(20000, 20000, progressive=True))
        (root / split / "class_1" / "giant.jpg").write_bytes(hostile_jpeg(65500, 65500))
    command = [sys.executable, "-m", "data_pipeline.prepare", "--source", str(root), "--out", str(tmp_path / "o")]
    result = subprocess.run(
        [*command, "--formats", fmt],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (
        f"skipped {root / 'train' / 'class_0' / 'huge.jpg'}: OversizedImageError: declares 20000x20000" in result.stdout
    )
    manifest = prep.read_manifest(tmp_path / "o")
    skipped = manifest["splits"]["train"][f"{fmt}_skipped"]
    assert sorted(s["path"] for s in skipped) == sorted(
        str(root / "train" / p) for p in ("class_0/huge.jpg", "class_1/giant.jpg")
    )
    assert all("declares" in s["reason"] and "--max-image-pixels" in s["reason"] for s in skipped)
    if fmt == "ffcv":  # FFCV stores images re-encoded at prepare's --max-side: nothing hostile reaches a .beton
        return
    out = tmp_path / "stored"
    prep.prepare(str(root), out, ["webdataset"], quiet=True, max_image_pixels=65500 * 65500)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for split, train in (("train", True), ("val", False)):
        loader = build_loader(config(out, fmt, batch_size=4, num_workers=0), split, train=train)
        assert sum(len(b) for b in loader) == loader.num_samples - 2
        reasons = {key: reason for _, key, reason in loader.last_summary.skipped}
        assert sorted(reasons) == [f"{split}_class_0_huge", f"{split}_class_1_giant"]
        assert all(r.startswith("OversizedImage: its header declares") for r in reasons.values())
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # KiB: nothing decoded


# ---- multi-resolution rescale ------------------------------------------------------------------------
def test_rescale_is_a_no_op_at_base_resolution():
    batch = torch.rand(2, 3, 32, 32)
    assert rescale(batch, 32) is batch


def test_rescale_is_bicubic_without_corner_alignment():
    batch = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = rescale(batch, 24)
    assert out.shape == (2, 3, 24, 24) and out.device == batch.device
    expected = TF.resize(batch, [24, 24], interpolation=TF.InterpolationMode.BICUBIC, antialias=False)
    torch.testing.assert_close(out, expected)
    up = rescale(batch, 48)
    assert not torch.allclose(up, F.interpolate(batch, size=48, mode="bilinear", align_corners=False))
    torch.testing.assert_close(up, F.interpolate(batch, size=48, mode="bicubic", align_corners=False))
    assert rescale(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 16).dtype == torch.float32


def test_normalize_uint8():
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(images, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_batches_come_channels_last_and_normalize_makes_them_nchw(digits, workers):
    """Workers stack each image with a plain copy (their resized crops are channels-last in memory), so a
    batch is NCHW channels-last; ``normalize`` returns contiguous NCHW, the same numbers either way."""
    loader = build_loader(config(digits, "webdataset", batch_size=8, num_workers=workers), "train", train=True)
    batch = next(iter(loader))
    assert batch.images.shape[1] == 3 and batch.images.is_contiguous(memory_format=torch.channels_last)
    out = normalize(batch.images, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert out.is_contiguous()
    assert torch.equal(out, normalize(batch.images.contiguous(), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))
    loader.close()


def test_ffcv_bad_input_is_reported_and_a_damaged_file_fails_at_start(tmp_path):
    from data_helpers import make_image_folder

    root = make_image_folder(tmp_path / "f", classes=2, per_class=6, corrupt=1)
    out = tmp_path / "o"
    prep.prepare(str(root), out, ["ffcv"], quiet=True)
    loader = build_loader(config(out, "ffcv", batch_size=4, base_resolution=16), "train", train=True)
    assert sum(len(b) for b in loader) == len(loader) * 4
    assert any("train_class_0_broken0" in line for line in loader.last_summary.problems)
    assert "broken0" in loader.last_summary.text()
    beton = out / "train.beton"
    beton.write_bytes(beton.read_bytes()[: beton.stat().st_size // 3])
    with pytest.raises(DataError, match=r"train\.beton"):
        build_loader(config(out, "ffcv", batch_size=4, base_resolution=16), "train", train=True)


@pytest.mark.parametrize("policy", ["imagenet", "v0"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_auto_augment_is_seeded_per_sample(digits, fmt, policy):
    cfg = config(digits, fmt, auto_augment=policy)
    plain = next(iter(build_loader(config(digits, fmt), "train", train=True, seed=3)))
    first = build_loader(cfg, "train", train=True, seed=3)
    a = [b.images.clone() for _, b in zip(range(3), first)]
    resumed = build_loader(cfg, "train", train=True, seed=3)
    resumed.load_state_dict({**first.state_dict(), "epoch": 0, "position": 2})
    assert torch.equal(next(iter(resumed)).images, a[2])
    assert a[0].shape == plain.images.shape and not torch.equal(a[0], plain.images)


def test_v0_policy_is_timms_tf_autoaugment_with_mean_fill():
    from timm.data.auto_augment import auto_augment_transform
    from torchvision.transforms.v2 import functional as F2

    from data_pipeline.transforms import TFAutoAugmentV0, seeded

    cfg = DataConfig(base_resolution=32, auto_augment="v0", mean=(0.5, 0.25, 0.75))
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = [seeded(TFAutoAugmentV0(cfg), image, s) for s in range(40)]
    policy = auto_augment_transform("v0", {"translate_const": 14, "img_mean": (128, 64, 191)})
    import random as pyrandom

    compared = 0
    for s, got in enumerate(ours):
        pyrandom.seed(s)
        np.random.seed(s)
        try:
            expected = F2.pil_to_tensor(policy(F2.to_pil_image(image)))
        except ValueError:  # timm asks Pillow to keep 0 bits, which it refuses; ours gives the TF black image
            assert got.shape == image.shape and got.dtype == torch.uint8
            continue
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
        compared += 1
    assert compared > 30 and sum(not torch.equal(o, image) for o in ours) > 20  # the policy does change images


@pytest.mark.parametrize("fmt", FORMATS)
def test_files_that_changed_after_prepare_are_refused(tmp_path, digits, fmt):
    copy = tmp_path / "copy"
    shutil.copytree(digits, copy)
    victim = sorted(copy.glob("train-*.tar"))[1] if fmt == "webdataset" else copy / "train.beton"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content: only the sha256 tells
    victim.write_bytes(bytes(data))
    build_loader(config(copy, fmt), "train", train=True)
    with pytest.raises(DataError, match=f"{victim.name} does not match the sha256"):
        build_loader(config(copy, fmt, verify="start"), "train", train=True)
    victim.write_bytes(bytes(data[: len(data) // 2]))  # what an interrupted prepare or copy leaves
    with pytest.raises(DataError, match=rf"{victim.name} has {len(data) // 2} bytes but .* lists {len(data)}"):
        build_loader(config(copy, fmt), "train", train=True)


def test_ffcv_runs_on_a_one_core_allocation(digits):
    """numba caps its threads at the CPU affinity; asking FFCV for more made the loader fail at start."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    code = (
        "import os, sys; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
        "from pathlib import Path; from data_pipeline import DataConfig, build_loader; "
        "c = DataConfig(format='ffcv', root=Path(sys.argv[1]), batch_size=16, num_workers=2, eval_resize=36); "
        "shapes = {tuple(b.images.shape[1:]) for b in build_loader(c, 'val', train=False)}; "
        "print(sorted(shapes), flush=True); os._exit(0)"  # a whole epoch, then no interpreter teardown race
    )
    out = subprocess.run([sys.executable, "-c", code, str(digits)], capture_output=True, text=True, env=child_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("[(3, 32, 32)]")
