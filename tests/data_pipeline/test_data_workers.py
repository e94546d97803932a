"""Loaders' worker processes and FFCV's decoder: persistent workers, open files, exit with idle workers, FFCV's
CHW decode and raw pixels, the fork server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import all_batches, config
from trainer_helpers import child_env

from data_pipeline import build_loader
from data_pipeline import prepare as prep


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    prep.prepare("digits", out, ["webdataset", "ffcv"], shard_mb=0.25, quiet=True)
    return out


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
    for pid in (server, *(w.pid for w in workers)):  # set aside while the parent lives, not ignored
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            assert signal_mask(pid, "SigCgt") >> (sig - 1) & 1, f"{pid} does not handle {sig.name}"
            assert not signal_mask(pid, "SigIgn") >> (sig - 1) & 1, f"{pid} ignores {sig.name}"
    os.kill(server, signal.SIGTERM)  # SLURM's signal to the whole step: the rank still reads batches after it
    os.kill(workers[0].pid, signal.SIGTERM)
    assert sum(len(b) for b in loader) == 300
    loader.close()


def signal_mask(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith(f"{field}:")).split()[1], 16)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_data_workers_die_with_their_rank(digits, sig):
    """A rank killed (SIGKILL; or SIGTERM before it handles signals, e.g. while the teacher-logit cache is built)
    takes its fork server and workers with it (issue 37 item 6: they ran on, re-parented to init, holding
    their shards open, for as long as the machine lived)."""
    code = (
        "import sys, time; from pathlib import Path; "
        "from data_pipeline import DataConfig, build_loader; "
        "c = DataConfig(root=Path(sys.argv[1]), batch_size=16, num_workers=2, eval_resize=36); "
        "it = iter(build_loader(c, 'val', train=False)); next(it); "
        "print('ready', flush=True); time.sleep(600)"
    )
    rank = subprocess.Popen(
        [sys.executable, "-c", code, str(digits)], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    helpers: list[int] = []
    try:
        assert rank.stdout.readline().strip() == "ready"
        servers = [p for p in _children(rank.pid) if len(_children(p)) == 2]
        assert len(servers) == 1, "no fork server with two workers"
        helpers = [servers[0], *_children(servers[0])]
        rank.send_signal(sig)
        rank.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in helpers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in helpers if alive(pid)], "helpers outlived their rank"
    finally:
        for pid in [rank.pid, *helpers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        rank.wait(timeout=30)


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and alive(int(p.name)) and _parent_of(int(p.name)) == pid
    ]


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


def test_an_orphaned_helper_ends_on_sigterm():
    """``stay_unless_orphaned``: SIGTERM is set aside while the recorded parent is the parent, and ends the
    process once it is not (an orphan)."""
    code = (
        "import os, sys, time; from data_pipeline.worker_start import stay_unless_orphaned; "
        "stay_unless_orphaned(int(sys.argv[1]) or os.getppid()); print('ready', flush=True); time.sleep(60)"
    )
    for recorded, ends in ((0, False), (1, True)):  # 1: a parent that is not ours, as for an orphan
        helper = subprocess.Popen(
            [sys.executable, "-c", code, str(recorded)], stdout=subprocess.PIPE, text=True, env=child_env()
        )
        try:
            assert helper.stdout.readline().strip() == "ready"
            helper.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                helper.wait(timeout=3)
            assert (helper.returncode == -signal.SIGTERM) if ends else helper.returncode is None
        finally:
            helper.kill()
            helper.wait(timeout=30)
