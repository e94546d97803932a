"""Notice that the launcher which started this rank is gone.

Ctrl-C to the ``deepspeed`` command alone (its runner process, not the whole process group) ends the runner at once
and nothing else: DeepSpeed's per-node ``launch.py`` and the ranks would train on, orphaned, to the end.  A rank
therefore watches the launcher processes above it (DeepSpeed's ``launch.py`` and its runner, torchrun's agent) and
reports when one of them exits, so that the rank can save and stop as it does on Ctrl-C.  A rank that no launcher
started (plain ``python``, ``srun``, ``nohup``) watches nothing: its parent may end without meaning the run should.

Linux only (``pidfd_open``, Linux 5.3): each launcher is held by a process file descriptor, which becomes readable
when that process exits; a daemon thread waits on them.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_LAUNCHER_MODULES = {"deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run"}
_LAUNCHER_SCRIPTS = {"deepspeed", "torchrun"}


@dataclass(frozen=True, slots=True)
class Launcher:
    pid: int
    name: str
    """How it was started, shortened: ``deepspeed.launcher.launch``, ``deepspeed``, ``torchrun``..."""


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name, in parentheses, may hold spaces


def launcher_name(argv: list[str]) -> str | None:
    """The launcher a command line runs (``python -m MODULE`` or a console script), or None."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m" and argv[i + 1] in _LAUNCHER_MODULES:
            return argv[i + 1]
    for arg in argv[:2]:  # the script itself, or the script a Python interpreter runs
        if Path(arg).name in _LAUNCHER_SCRIPTS:
            return Path(arg).name
    return None


def launchers_above(pid: int | None = None) -> list[Launcher]:
    """The unbroken chain of launcher processes above ``pid`` (this process): its parent if that is a launcher,
    that one's parent if it is a launcher too, and so on."""
    chain: list[Launcher] = []
    parent = _parent_of(pid) if pid is not None else os.getppid()
    while parent and parent > 1 and (name := launcher_name(_cmdline(parent))) is not None:
        chain.append(Launcher(parent, name))
        parent = _parent_of(parent)
    return chain


class LauncherWatch:
    """Calls ``on_gone(launcher)`` once, from a daemon thread, when one of ``launchers`` has exited (at once if one
    already has).  :meth:`close` stops watching."""

    def __init__(self, launchers: list[Launcher], on_gone: Callable[[Launcher], None]):
        self.launchers = launchers
        self._on_gone = on_gone
        self._wake_read, self._wake_write = os.pipe()
        self._fds: dict[int, Launcher] = {}
        gone = None
        for i, launcher in enumerate(launchers):
            try:
                fd = os.pidfd_open(launcher.pid)
            except ProcessLookupError:
                gone = gone or launcher
                continue
            self._fds[fd] = launcher
            # The pid may have been reused between reading it and opening it: it is still the launcher only if
            # the process below it still names it as its parent.
            below = _parent_of(launchers[i - 1].pid) if i else os.getppid()
            if below != launcher.pid:
                gone = gone or launcher
        self._thread = threading.Thread(target=self._wait, args=(gone,), name="launcher-watch", daemon=True)
        self._thread.start()

    def _wait(self, gone: Launcher | None) -> None:
        if gone is None:
            poller = select.poll()
            for fd in (*self._fds, self._wake_read):
                poller.register(fd, select.POLLIN)
            ready = [fd for fd, _ in poller.poll()]
            if self._wake_read in ready:
                return
            gone = self._fds[ready[0]]
        self._on_gone(gone)

    def close(self) -> None:
        if self._wake_write < 0:
            return
        os.write(self._wake_write, b"x")
        self._thread.join(timeout=5)
        for fd in (*self._fds, self._wake_read, self._wake_write):
            os.close(fd)
        self._fds, self._wake_write = {}, -1


def watch_launchers(on_gone: Callable[[Launcher], None]) -> LauncherWatch | None:
    """Watch the launchers above this process (None: none started it, or this system has no ``pidfd_open``)."""
    launchers = launchers_above()
    if not launchers or not hasattr(os, "pidfd_open"):
        return None
    try:
        return LauncherWatch(launchers, on_gone)
    except OSError:  # ENOSYS: a kernel older than 5.3
        return None
