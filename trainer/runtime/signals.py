"""Stop requests: SIGUSR1 (SLURM's warning before the time limit), SIGTERM and SIGINT (Ctrl-C) ask the run to
save at the next step boundary and stop (every rank agrees on it there); a second Ctrl-C interrupts at once."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Records the first stop signal received; :meth:`restore` puts the previous handlers back."""

    def __init__(self) -> None:
        self.received = 0
        self._previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without saving
        self.received = signum

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
