"""Stop requests: SIGUSR1 (SLURM's warning before the time limit), SIGTERM and SIGINT (Ctrl-C) ask the run to
save at the next step boundary and stop (every rank agrees on it there); a second Ctrl-C interrupts at once.  So
does the exit of the launcher that started this rank (Ctrl-C to the ``deepspeed`` command alone ends only it:
:mod:`trainer.runtime.launcher_watch`)."""

from __future__ import annotations

import signal

from trainer.runtime.launcher_watch import Launcher, watch_launchers

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
"""What a run stopped by Ctrl-C exits with once it saved: 130, as an interrupted command does, so that
``python trainer/run.py ... && next`` does not go on.  SIGTERM and SIGUSR1 (a scheduler's preemption, which a job
script follows with a requeue) exit 0, and so does a rank whose launcher is gone: no one reads its exit code but an
orphaned ``launch.py``, which would print an error line with the whole command for any other."""


class StopSignals:
    """Records the first stop request received; :meth:`restore` puts the previous handlers back and stops watching
    the launcher."""

    def __init__(self) -> None:
        self.received = 0
        """The first stop signal's number, 0 if none."""
        self.launcher_gone: Launcher | None = None
        self._previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        self._watch = watch_launchers(self._on_launcher_gone)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received:
            raise KeyboardInterrupt  # Ctrl-C after a stop signal: stop now, without saving
        self.received = self.received or signum

    def _on_launcher_gone(self, launcher: Launcher) -> None:  # the watch's thread
        self.launcher_gone = launcher

    @property
    def requested(self) -> bool:
        return bool(self.received) or self.launcher_gone is not None

    @property
    def reason(self) -> str:
        """Why the run stops, the start of its last line."""
        if self.received or self.launcher_gone is None:
            return "signal received"
        return f"launcher gone ({self.launcher_gone.name}, pid {self.launcher_gone.pid}, exited)"

    @property
    def exit_code(self) -> int:
        """The exit code of a run that stopped on this request (after saving)."""
        return INTERRUPTED_EXIT_CODE if self.received == signal.SIGINT else 0

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if self._watch is not None:
            self._watch.close()
