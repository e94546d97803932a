"""Data files that go bad after ``prepare``: same-size corruption (only a hash tells) and files changed while a
run reads them.  The run must stop with a message naming the file and commit no checkpoint from such data."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_helpers import overrides, run_in_process

from data_pipeline import DataError
from data_pipeline import prepare as prep
from data_pipeline.integrity import DataWatch, split_files
from trainer.config import load_config
from trainer.state.checkpoint import committed_tags


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits_both")
    prep.prepare("digits", out, ["webdataset", "ffcv"], shard_mb=0.25, quiet=True)
    return out


@pytest.fixture()
def digits(prepared, tmp_path) -> Path:
    copy = tmp_path / "digits"
    shutil.copytree(prepared, copy)
    return copy


def flip_middle(path: Path, length: int = 4096) -> None:
    """Invert ``length`` bytes in the middle of ``path``: same size, different content."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + length] = bytes(b ^ 0xFF for b in data[mid : mid + length])
    path.write_bytes(bytes(data))


def victim(root: Path, fmt: str) -> Path:
    return root / "train.beton" if fmt == "ffcv" else sorted(root.glob("train-*.tar"))[1]


@pytest.mark.parametrize("fmt", ["webdataset", "ffcv"])
def test_the_background_hash_finds_a_same_size_change(digits, fmt):
    entries = split_files(digits, ["train", "val"], fmt)
    assert {e["name"] for e in entries} >= (
        {"train.beton", "val.beton"} if fmt == "ffcv" else {victim(digits, fmt).name}
    )
    assert DataWatch(digits, entries, hash_files=True).problem(wait=True) is None
    bad = victim(digits, fmt)
    flip_middle(bad)
    stamp_only = DataWatch(digits, entries, hash_files=False)
    assert stamp_only.problem(wait=True) is None  # size and mtime alone cannot see it
    problem = DataWatch(digits, entries, hash_files=True).problem(wait=True)
    assert problem and str(bad) in problem and "sha256" in problem


def test_a_file_changed_or_removed_during_the_run_is_noticed(digits):
    entries = split_files(digits, ["train"], "webdataset")
    watch = DataWatch(digits, entries, hash_files=False)
    shard = victim(digits, "webdataset")
    shard.write_bytes(shard.read_bytes()[:1000])
    assert f"{shard} changed during the run" in watch.problem()
    (digits / "train.beton").unlink()
    watch = DataWatch(digits, split_files(digits, ["train"], "webdataset"), hash_files=False)
    shard.unlink()
    assert f"{shard} was removed" in watch.problem()


@pytest.mark.parametrize("fmt", ["webdataset", "ffcv"])
def test_the_check_reads_only_the_format_the_run_reads(repo, digits, tmp_path, fmt):
    """A WebDataset run never reads the .beton files (nor an FFCV run the shards): one missing or changed is
    none of its business (issue 37 item 8: a WebDataset run stopped because an unused .beton was missing)."""
    from trainer.runtime.data import build_run_data

    unused = ["train.beton", "val.beton"] if fmt == "webdataset" else [p.name for p in digits.glob("*.tar")]
    for name in unused:
        (digits / name).unlink()
    config = load_config(repo / "configs/tiny_cpu.yaml", overrides(tmp_path / "run", digits, **{"data.format": fmt}))
    watch = build_run_data(config, rank=0, world=1, local_rank=0).watch
    assert watch.problem(wait=True) is None
    assert watch.entries and not {e["name"] for e in watch.entries} & set(unused)


@pytest.mark.parametrize("name", ["/dev/zero", "../outside.tar", "fifo", "folder"])
def test_the_check_refuses_names_that_are_not_regular_files_in_the_folder(digits, name):
    """A manifest name is a plain name of a regular file inside the data folder: ``/dev/zero`` (or a FIFO) would
    keep the hash, and the run waiting on it, busy for ever; the name is refused at once, naming the manifest."""
    os.mkfifo(digits / "fifo")
    (digits / "folder").mkdir()
    entries = [{"name": name, "size": 1, "sha256": "0" * 64}]
    with pytest.raises(DataError, match=rf"manifest\.json names .*{name.lstrip('./')}") as info:
        DataWatch(digits, entries, hash_files=True)
    assert "\n" not in str(info.value)


class BlockedHash:
    """A stand-in for ``hashlib.sha256`` whose ``update`` blocks until ``release`` (or 30 s, once): a data check
    that does not finish, and then gives a wrong digest."""

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()

    def __call__(self, *args):
        blocked = self

        class Digest:
            def update(self, data) -> None:
                if not blocked.release.wait(30):
                    blocked.release.set()  # a check that never ends would keep a test of the old code for ever

            def hexdigest(self) -> str:
                return "blocked"

        return Digest()


def test_the_wait_for_the_check_is_bounded(digits, monkeypatch):
    blocked = BlockedHash()
    monkeypatch.setattr("hashlib.sha256", blocked)
    try:
        watch = DataWatch(digits, split_files(digits, ["train"], "webdataset"), hash_files=True, stall_s=0.5)
        start = time.monotonic()
        assert watch.wait(stop=lambda: False)
        assert time.monotonic() - start < 5
        assert "the data check read nothing from" in watch.problem()
        stopped = DataWatch(digits, split_files(digits, ["train"], "webdataset"), hash_files=True)
        assert not stopped.wait(stop=lambda: True) and stopped.hashing
    finally:
        blocked.release.set()


def test_a_stop_signal_ends_the_wait_for_the_data_check(repo, digits, tmp_path, single_rank, monkeypatch):
    """SIGTERM while the run waits for the data check before its first checkpoint: the run stops at once
    (issue 37 item 8: it waited for ever), committing nothing, since that data was never checked."""
    import threading

    from trainer.loop import Trainer

    blocked = BlockedHash()
    monkeypatch.setattr("hashlib.sha256", blocked)
    run = tmp_path / "run"
    args = overrides(run, digits, **{"checkpoint.every_steps": 1, "optimizer.max_steps": 3})
    trainer = Trainer(load_config(repo / "configs/tiny_cpu.yaml", args))
    sent: list[float] = []

    def terminate_once_waiting() -> None:
        deadline = time.monotonic() + 60
        while trainer.global_step < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # inside the wait by now
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_once_waiting, daemon=True)
    try:
        killer.start()
        results = trainer.train()
        stopped = time.monotonic()
        killer.join()
    finally:
        trainer.close(failed=True)
        blocked.release.set()
    assert results["stopped_by_signal"] and results["global_step"] == 1
    assert stopped - sent[0] < 5
    assert committed_tags(run / "checkpoints") == []
    assert "stopped without committing a checkpoint" in (run / "console.log").read_text()


def test_a_corrupt_beton_stops_the_run_before_any_checkpoint(repo, digits, tmp_path, single_rank):
    flip_middle(digits / "train.beton", length=64 << 10)
    args = {"data.format": "ffcv", "checkpoint.every_steps": 1, "optimizer.max_steps": 3}
    _, results = run_in_process(repo, overrides(tmp_path / "unchecked", digits, **args, **{"data.verify": "never"}))
    assert results["global_step"] == 3  # the decoder accepts the corrupt file: without the hash it trains on it
    run = tmp_path / "checked"
    with pytest.raises(DataError, match=r"rank 0: .*train\.beton does not match the sha256") as info:
        run_in_process(repo, overrides(run, digits, **args))
    assert "last committed checkpoint: none" in str(info.value)
    assert committed_tags(run / "checkpoints") == []


def test_a_shard_cut_while_the_run_reads_it_stops_the_run(repo, digits, tmp_path, single_rank):
    run = tmp_path / "run"
    args = overrides(run, digits, **{"checkpoint.every_steps": 1, "optimizer.max_steps": 4})
    from trainer.loop import Trainer

    trainer = Trainer(load_config(repo / "configs/tiny_cpu.yaml", args))
    try:
        shard = victim(digits, "webdataset")
        shard.write_bytes(shard.read_bytes()[:2048])
        with pytest.raises(DataError, match=rf"{shard} changed during the run") as info:
            trainer.train()
        assert "stopped at step 1" in str(info.value)
    finally:
        trainer.close(failed=True)
    assert committed_tags(run / "checkpoints") == []


@pytest.mark.slow
def test_a_beton_cut_in_place_while_mapped_ends_the_run_with_a_message(repo, digits, tmp_path):
    """Cutting a memory-mapped file makes the next read of a lost page raise SIGBUS in FFCV's native code:
    the rank either notices the change at a step boundary (exit 2, the file named) or dies on the signal with
    every thread's Python stack printed (faulthandler), never silently."""
    run = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = overrides(
        run, digits, **{"data.format": "ffcv", "data.num_workers": 1, "optimizer.max_steps": 400, "optimizer.epochs": 5}
    )
    command = [sys.executable, "trainer/run.py", "--config", "configs/tiny_cpu.yaml", "--set", *args]
    log = tmp_path / "log.txt"
    process = subprocess.Popen(command, cwd=repo, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "step 3/" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, log.read_text()
        os.truncate(digits / "train.beton", 4096)
        rc = process.wait(timeout=300)
    finally:
        process.kill()
    text = log.read_text()
    assert rc in (2, -signal.SIGBUS), text
    if rc == 2:
        assert f"{digits / 'train.beton'} changed during the run" in text
    else:
        assert "Fatal Python error: Bus error" in text and "ffcv" in text
