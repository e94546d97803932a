"""Atomic writes: a reader never sees half a file, and the file gets the mode a plain new file gets under the
umask, whatever mode the library that wrote the temporary file chose."""

from __future__ import annotations

import contextlib
import os
import stat

import pytest

from fileops import atomic_output, atomic_write_text
from fileops.atomic import default_file_mode


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_file_written_0600_by_a_library_gets_the_umask_mode(tmp_path, mask, expected):
    with umask(mask):
        assert default_file_mode() == expected
        with atomic_output(tmp_path / "weights.bin") as tmp:
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600)  # as safetensors' writer creates its file
            os.write(fd, b"data")
            os.close(fd)
        atomic_write_text(tmp_path / "arch.yaml", "a: 1\n")
    assert mode(tmp_path / "weights.bin") == expected and mode(tmp_path / "arch.yaml") == expected
    assert (tmp_path / "weights.bin").read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arch.yaml", "weights.bin"]  # no temporary left


def test_an_export_is_readable_by_the_group_and_others_under_umask_022(tmp_path):
    """The search's exports and a one-network run's ``final/`` are written by ``models.save_subnet``."""
    from models import build_subnet, load_search_space, save_subnet

    space = load_search_space("tiny")
    with umask(0o022):
        folder = save_subnet(build_subnet(space, space.smallest(), num_classes=10), tmp_path / "export")
    files = sorted(p for p in folder.iterdir())
    assert files and all(mode(p) == 0o644 for p in files), {p.name: oct(mode(p)) for p in files}


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
