"""Checking, while training runs, that the data files are still the ones ``prepare`` listed.

Sizes are checked when a loader opens its files (``manifest.checked_file``).  A file whose bytes changed
but not its size (a bad copy, bit rot, a concurrent re-prepare) decodes without an error — JPEG decoders
are tolerant — and would train on wrong pixels.  :class:`DataWatch` hashes every listed file in a
background thread (``data.verify: background``), so the check costs no start-up time, and notices a file
whose size or modification time changed after the run opened it.  The trainer asks it at every step
boundary and waits for the hashes before committing a checkpoint, so no checkpoint is committed from data
that failed, or never passed, the check.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from data_pipeline.manifest import has_manifest, listed_files, manifest_path, read_manifest, sha256_of


def split_files(root: Path, splits: list[str]) -> list[dict]:
    """Manifest entries (``name``, ``size``, ``sha256``) of every file of ``splits``; [] without a manifest."""
    if not has_manifest(root):
        return []
    manifest = read_manifest(root)
    return listed_files({"splits": {s: v for s, v in manifest["splits"].items() if s in splits}})


class DataWatch:
    """Hashes ``entries`` (files under ``root``) in a daemon thread when ``hash_files``; remembers each file's
    size and modification time so that a change during the run is noticed as well."""

    def __init__(self, root: Path, entries: list[dict], *, hash_files: bool) -> None:
        self.root = Path(root)
        self.entries = [e for e in entries if e.get("sha256")] if hash_files else []
        self.stamps = {e["name"]: self._stamp(e["name"]) for e in entries}
        self._problem: str | None = None
        self._done = threading.Event()
        if self.entries:
            threading.Thread(target=self._hash_all, name="data-sha256", daemon=True).start()
        else:
            self._done.set()

    def _stamp(self, name: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self.root / name)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def _hash_all(self) -> None:
        try:
            for entry in self.entries:
                path = self.root / entry["name"]
                if sha256_of(path) != entry["sha256"]:
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

    def problem(self, *, wait: bool = False) -> str | None:
        """What is wrong with the data so far (None: nothing found yet).  ``wait``: first let the hashes finish."""
        if wait:
            self._done.wait()
        for name, stamp in self.stamps.items():
            now = self._stamp(name)
            if now != stamp:
                what = "was removed" if now is None else f"changed during the run (size {stamp[0]} -> {now[0]} bytes)"
                return f"{self.root / name} {what}: the batches read from it since may be wrong; prepare it again"
        return self._problem
