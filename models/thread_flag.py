"""A per-thread switch that a ``with`` block turns on."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ThreadFlag:
    """False until :meth:`on` is entered on the current thread; blocks nest, and leaving one restores what
    was there before (so an inner block does not switch an outer one off)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __bool__(self) -> bool:
        return getattr(self._local, "active", False)

    @contextmanager
    def on(self) -> Iterator[None]:
        before = bool(self)
        self._local.active = True
        try:
            yield
        finally:
            self._local.active = before
