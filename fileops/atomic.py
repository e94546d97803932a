"""Atomic file writes (temporary name → fsync → rename → fsync of the folder)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

TEMP_PREFIX = "."
TEMP_MARK = ".tmp-"


def temp_path_for(target: Path) -> Path:
    """The temporary name used while ``target`` is written: hidden, in the same folder (so the rename stays on
    one file system), unique per process, and keeping the suffix (libraries that pick a format by suffix
    still work): ``dir/.name.tmp-<pid>.suffix``."""
    target = Path(target)
    return target.with_name(f"{TEMP_PREFIX}{target.stem}{TEMP_MARK}{os.getpid()}{target.suffix}")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (``0o666 & ~umask``), read from
    ``/proc/self/status`` where it is there (changing the umask to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_output(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``target`` through (for libraries that write by file name); on
    success it is fsynced, given the mode a plain new file gets under the umask (some libraries create theirs
    ``0600``, which teammates could not read) and renamed over ``target``; on failure removed.  The parent
    folder is created."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(target)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_output(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | Path, text: str) -> Path:
    with atomic_output(target) as tmp:
        tmp.write_text(text)
    return Path(target)
