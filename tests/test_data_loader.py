"""Loaders: shares per rank, determinism, exact mid-epoch resume, bad input, rescale."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_helpers import rewrite_tar
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


def config(root: Path, fmt: str, **kw) -> DataConfig:
    base = dict(format=fmt, root=root, batch_size=16, num_workers=2, eval_resize=36, crop_scale=(0.3, 1.0))
    base.update(kw)
    return DataConfig(**base)


def all_batches(loader):
    return [(b.images.clone(), b.labels.clone()) for b in loader]


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
    with pytest.raises(DataError, match="no shards match"):
        build_loader(config(tmp_path / "nothing", "webdataset"), "train", train=True)
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


# ---- persistent workers, FFCV's CHW decoder -------------------------------------------------------------
def worker_pids() -> set[int]:
    import multiprocessing

    return {p.pid for p in multiprocessing.active_children()}


def test_persistent_workers_give_the_batches_of_fresh_ones(digits):
    """The WebDataset workers outlive an epoch; batches stay those of a loader built for each epoch, and an
    epoch left early (its workers ended) resumes exactly."""
    cfg = config(digits, "webdataset")
    before = worker_pids()
    kept = build_loader(cfg, "train", train=True, rank=0, world_size=2, seed=11)
    epochs = [all_batches(kept)]
    workers = worker_pids() - before
    assert len(workers) == 2  # idle, waiting for the next epoch
    epochs.append(all_batches(kept))
    assert worker_pids() - before == workers  # the same processes read epoch 1
    for epoch, batches in enumerate(epochs):
        fresh = build_loader(cfg, "train", train=True, rank=0, world_size=2, seed=11)
        fresh.set_epoch(epoch)
        expected = all_batches(fresh)
        fresh.close()
        assert len(batches) == len(expected) == len(kept)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, expected))

    # Three batches into epoch 2, then away: the workers end instead of decoding what they had queued.
    it = iter(kept)
    third = [next(it) for _ in range(3)][-1].images.clone()
    state = kept.state_dict()
    del it
    assert not worker_pids() - before
    kept.load_state_dict({**state, "position": 2})  # back one batch, on the same loader: new workers
    rest = all_batches(kept)
    assert torch.equal(rest[0][0], third) and len(rest) == len(kept) - 2
    reference = build_loader(cfg, "train", train=True, rank=0, world_size=2, seed=11)
    reference.set_epoch(2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, all_batches(reference)[2:]))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(all_batches(kept), all_batches(reference)))  # epoch 3
    kept.close(), reference.close()
    assert not worker_pids() - before


def test_shard_reads_keep_a_bounded_number_of_files_open(digits, monkeypatch):
    from data_pipeline import wds_backend
    from data_pipeline.shards import index_shards, read_bytes, split_shards

    monkeypatch.setattr(wds_backend, "_OPEN_SHARDS", 2)
    refs, _ = index_shards(split_shards(digits, "train"))
    assert len({ref.shard for ref in refs}) > 2
    samples = wds_backend._Samples(refs, None, train=False)
    for ref in refs[::-37] + refs[::41]:  # back and forth across the shards
        assert samples._read(ref.shard, ref.image).numpy().tobytes() == read_bytes(ref.shard, ref.image)
        assert len(samples._files) <= 2
    samples.close()
    assert not samples._files


def test_a_process_with_idle_workers_exits(digits):
    """Idle workers ignore SIGTERM (SLURM's), which is how multiprocessing ends daemon processes at exit: the
    loader ends them first, or the interpreter would wait for them for ever."""
    code = (
        "import sys; from pathlib import Path; "
        "from data_pipeline import DataConfig, build_loader; "
        "c = DataConfig(root=Path(sys.argv[1]), batch_size=16, num_workers=2, eval_resize=36); "
        "loader = build_loader(c, 'val', train=False); print(sum(len(b) for b in loader))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(digits)], capture_output=True, text=True, timeout=120, env=child_env()
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "300"


def test_ffcv_images_are_our_torchvision_transforms_of_ffcvs_decode(tmp_path):
    """What the FFCV decoder writes is, per sample, torchvision's transforms (the ones the WebDataset path
    runs) of FFCV's JPEG decode: train, the seeded crop resized bicubic with antialias, then the flip; eval,
    ``eval_transform`` (Resize + CenterCrop).  Computed here one image at a time, compared bit for bit."""
    from data_helpers import make_image_folder
    from ffcv.libffcv import imdecode
    from ffcv.reader import Reader
    from numba import njit
    from torchvision.transforms import v2

    from data_pipeline.ffcv_backend import _MASK32, _seeded_crop_and_flip
    from data_pipeline.plan import splitmix64
    from data_pipeline.transforms import BICUBIC, eval_transform

    root = make_image_folder(tmp_path / "f", classes=2, per_class=12)
    out = tmp_path / "o"
    prep.prepare(str(root), out, ["ffcv"], quiet=True)
    reader = Reader(str(out / "train.beton"))
    data = np.fromfile(out / "train.beton", dtype=np.uint8)
    crop = njit(_seeded_crop_and_flip)  # numba's generator, as in the pipeline

    def decoded(index: int) -> torch.Tensor:
        field = reader.metadata[f"f{list(reader.handlers).index('image')}"][index]
        height, width = int(field["height"]), int(field["width"])
        pointer = int(field["data_ptr"])
        size = int(reader.alloc_table["size"][reader.alloc_table["ptr"] == pointer][0])
        image = np.empty((height, width, 3), dtype=np.uint8)
        imdecode(data[pointer : pointer + size], image, height, width, height, width, 0, 0, 1, 1, False, False)
        return torch.from_numpy(image).permute(2, 0, 1)

    size, seed, flips = 16, 5, 0
    for train in (True, False):
        cfg = config(out, "ffcv", batch_size=8, base_resolution=size, crop_scale=(0.3, 1.0), eval_resize=21)
        loader = build_loader(cfg, "train", train=train, seed=seed)
        for batch in loader:
            assert batch.images.is_contiguous() and batch.images.shape[1:] == (3, size, size)
            with np.errstate(over="ignore"):
                key = splitmix64(np.uint64(seed) ^ splitmix64(np.uint64(int(batch.indices[0]))))
            for index, image in zip(batch.indices.tolist(), batch.images):
                source = decoded(index)
                if train:
                    with np.errstate(over="ignore"):
                        sample_seed = int(splitmix64(key ^ np.uint64(index)) & _MASK32)
                    height, width = source.shape[1:]
                    i, j, h, w, flip = crop(height, width, 0.3, 1.0, np.log(3 / 4), np.log(4 / 3), sample_seed)
                    expected = v2.functional.resized_crop(source, i, j, h, w, [size, size], BICUBIC, antialias=True)
                    expected = v2.functional.horizontal_flip(expected) if flip else expected
                    flips += bool(flip)
                else:
                    expected = eval_transform(cfg)(source)
                assert torch.equal(image, expected)
    assert flips > 0


def test_an_ffcv_loader_leaves_the_torch_thread_count_alone(digits):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader = build_loader(config(digits, "ffcv", num_workers=2), "val", train=False)
        assert torch.get_num_threads() == 1  # FFCV's loader sets it to its decode threads
        next(iter(loader))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_ffcv_raw_pixels_give_the_jpeg_path_s_batches_without_its_compression(digits, tmp_path):
    """``--ffcv-images raw`` stores pixels instead of JPEGs: the same samples, crops and flips as the JPEG
    .beton, the images differing only by what JPEG compression lost; recorded in the manifest."""
    import json

    raw = tmp_path / "raw"
    prep.prepare("digits", raw, ["ffcv"], quiet=True, ffcv_images="raw")
    assert json.loads((raw / "manifest.json").read_text())["options"]["ffcv_images"] == "raw"
    assert "ffcv_images" not in json.loads((digits / "manifest.json").read_text())["options"]
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader

    for root, mode in ((raw, "raw"), (digits, "jpg")):
        reader = Reader(str(root / "train.beton"))
        stored = reader.metadata[f"f{list(reader.handlers).index('image')}"]["mode"]
        assert set(stored.tolist()) == {IMAGE_MODES[mode]}
    with pytest.raises(ValueError, match="ffcv_images"):
        prep.prepare("digits", tmp_path / "bad", ["ffcv"], quiet=True, ffcv_images="png")
    for train in (True, False):
        split = "train" if train else "val"
        batches = [
            all_batches(build_loader(config(root, "ffcv"), split, train=train, seed=3)) for root in (digits, raw)
        ]
        assert [labels.tolist() for _, labels in batches[0]] == [labels.tolist() for _, labels in batches[1]]
        jpeg, pixels = (torch.cat([images for images, _ in b]).float() for b in batches)
        assert jpeg.shape == pixels.shape
        error = (jpeg - pixels).abs().mean().item()
        assert 0 < error < 4, error  # measured ~1 level: JPEG at quality 90 (another seed's batches: ~80)


def test_webdataset_workers_are_forked_by_the_fork_server(digits):
    """Workers are not forked by the training process, which runs other threads: a fork there can hang the
    child (CPython before 3.11.8, gh-112275; seen in CI). Their parent is the fork server, which ignores the
    signals SLURM sends to the whole step, as the workers do."""
    import threading

    loader = build_loader(config(digits, "webdataset", num_workers=2), "val", train=False)
    feeder = threading.Thread(target=lambda: [threading.Event().wait(0.001) for _ in range(2000)])
    feeder.start()  # a thread running while the workers start, as a rank's are
    assert sum(len(b) for b in loader) == 300
    feeder.join()
    workers = loader.backend._idle._iterator._workers
    parents = {int(Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for w in workers}
    assert len(workers) == 2 and os.getpid() not in parents and len(parents) == 1
    (server,) = parents
    ignored = int(
        next(
            line for line in Path(f"/proc/{server}/status").read_text().splitlines() if line.startswith("SigIgn:")
        ).split()[1],
        16,
    )
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        assert ignored >> (sig - 1) & 1, f"the fork server does not ignore {sig.name}"
    loader.close()
