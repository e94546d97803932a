"""Checking, while training runs, that the data files are still the ones ``prepare`` listed.

Sizes are checked when a loader opens its files (``manifest.checked_file``).  A file whose bytes changed
but not its size (a bad copy, bit rot, a concurrent re-prepare) decodes without an error — JPEG decoders
are tolerant — and would train on wrong pixels.  :class:`DataWatch` hashes the files the run reads (those of
its ``data.format``) in a background thread (``data.verify: background``), so the check costs no start-up
time, and notices a file whose size or modification time changed after the run opened it.  The trainer asks
it at every step boundary and waits for the hashes before committing a checkpoint, so no checkpoint is
committed from data that failed, or never passed, the check.

The manifest is input, not trusted: a listed name must be a plain file name inside the data folder and name
a regular file (a name such as ``/dev/zero`` or a FIFO would never finish hashing), and no file is read past
its listed size.  The wait is bounded (a hash that reads nothing for :data:`STALL_S` seconds is a problem)
and a caller's stop request (a signal) ends it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from data_pipeline.manifest import DataError, _inside, has_manifest, manifest_path, read_manifest

STALL_S = 300.0
"""Seconds the background hash may read nothing before the wait gives up (a hung network file system)."""
BLOCK = 1 << 20


def split_files(root: Path, splits: list[str], data_format: str) -> list[dict]:
    """Manifest entries (``name``, ``size``, ``sha256``) of the files a ``data_format`` run reads for ``splits``
    (WebDataset shards or FFCV files, never the other format's); [] without a manifest."""
    if not has_manifest(root):
        return []
    listed = read_manifest(root)["splits"]
    files: list[dict] = []
    for split in splits:
        entry = listed.get(split) or {}
        if data_format == "webdataset":
            files += entry.get("webdataset", {}).get("shards", [])
        elif "ffcv" in entry:
            files.append(entry["ffcv"])
    return files


def _listed_path(root: Path, entry: dict) -> Path:
    """The path of a manifest entry: a plain name inside ``root`` naming a regular file (or nothing yet: a
    missing file is the loader's to report); anything else is a DataError naming the manifest."""
    path = _inside(root, entry.get("name"))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise DataError(f"{manifest_path(root)} names {path}, which cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{manifest_path(root)} names {path}, which is not a regular file")
    return path


class DataWatch:
    """Hashes ``entries`` (files under ``root``) in a daemon thread when ``hash_files``; remembers each file's
    size and modification time so that a change during the run is noticed as well."""

    def __init__(self, root: Path, entries: list[dict], *, hash_files: bool, stall_s: float = STALL_S) -> None:
        self.root = Path(root)
        self.paths = {e["name"]: _listed_path(self.root, e) for e in entries}
        self.entries = [e for e in entries if e.get("sha256")] if hash_files else []
        self.stamps = {name: self._stamp(path) for name, path in self.paths.items()}
        self.stall_s = stall_s
        self._problem: str | None = None
        self._read = 0
        """Bytes hashed so far: the wait's sign of progress."""
        self._reading: Path | None = None
        self._done = threading.Event()
        if self.entries:
            threading.Thread(target=self._hash_all, name="data-sha256", daemon=True).start()
        else:
            self._done.set()

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def _sha256(self, path: Path, size: int | None) -> str:
        """sha256 of ``path``, reading at most one byte past its listed ``size`` (more already differs)."""
        digest, left = hashlib.sha256(), (size + 1 if isinstance(size, int) else None)
        with open(path, "rb") as f:
            while left is None or left > 0:
                block = f.read(BLOCK if left is None else min(BLOCK, left))
                if not block:
                    break
                digest.update(block)
                self._read += len(block)
                left = None if left is None else left - len(block)
        return digest.hexdigest()

    def _hash_all(self) -> None:
        try:
            for entry in self.entries:
                path = self._reading = self.paths[entry["name"]]
                if self._sha256(path, entry.get("size")) != entry["sha256"]:
                    self._problem = (
                        f"{path} does not match the sha256 in {manifest_path(self.root)} (its bytes changed after "
                        "prepare): prepare the dataset again"
                    )
                    return
        except OSError as exc:
            self._problem = f"cannot read {exc.filename}: {exc.strerror}"
        finally:
            self._done.set()

    @property
    def hashing(self) -> bool:
        """True while the background hashes are still running."""
        return not self._done.is_set()

    def wait(self, stop: Callable[[], bool] = lambda: False, *, poll_s: float = 0.2) -> bool:
        """Wait for the hashes: True once they are done (or have read nothing for ``stall_s`` seconds, which
        :meth:`problem` then reports); False as soon as ``stop()`` is true (a stop signal arrived)."""
        seen, since = self._read, time.monotonic()
        while not self._done.wait(poll_s):
            if stop():
                return False
            if self._read != seen:
                seen, since = self._read, time.monotonic()
            elif time.monotonic() - since > self.stall_s:
                self._problem = self._problem or (
                    f"the data check read nothing from {self._reading} for {self.stall_s:.0f} s (a hung file "
                    "system?): check the data folder, or set data.verify: start or never"
                )
                return True
        return True

    def problem(self, *, wait: bool = False) -> str | None:
        """What is wrong with the data so far (None: nothing found yet).  ``wait``: first let the hashes finish
        (:meth:`wait`, bounded)."""
        if wait:
            self.wait()
        for name, stamp in self.stamps.items():
            now = self._stamp(self.paths[name])
            if now != stamp:
                if now is None:
                    what = "was removed"
                elif stamp is None:
                    what = "appeared during the run"
                else:
                    what = f"changed during the run (size {stamp[0]} -> {now[0]} bytes)"
                return f"{self.paths[name]} {what}: the batches read from it since may be wrong; prepare it again"
        return self._problem
