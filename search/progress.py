"""What a search prints while it works: timestamped lines from the first rank, from the first candidate on.

A search spends minutes loading and evaluating before a generation ends; without these lines a user cannot tell
a slow search from a stuck one.
"""

from __future__ import annotations

import time

from rich.console import Console

from search.candidates import Progress
from search.evolution import Candidate

EVERY_S = 5.0
"""At most one progress line per this many seconds within a phase (the first and the last always print)."""


class SearchConsole:
    """``say`` a timestamped line (first rank only); ``progress(phase)`` a callback for ``CandidateStore.score``."""

    def __init__(self, console: Console, *, is_main: bool, world_size: int):
        self.console, self.is_main, self.world_size = console, is_main, world_size

    def say(self, text: str) -> None:
        if self.is_main:
            self.console.print(f"{time.strftime('%H:%M:%S')} {text}", highlight=False)

    def progress(self, phase: str) -> Progress:
        started = last = time.monotonic()

        def report(done: int, share: int, new: int, candidate: Candidate) -> None:
            nonlocal last
            now = time.monotonic()
            if done not in (1, share) and now - last < EVERY_S:
                return
            last = now
            each = (now - started) / done
            where = f" (rank 0's share of {new} new)" if self.world_size > 1 else ""
            self.say(
                f"{phase}: {done}/{share} scored{where}, {each:.1f} s each, ~{each * (share - done):.0f} s left; "
                f"last {candidate.mflops:.3f} MFLOPs, top-1 {candidate.top1:.2f}%"
            )

        return report
