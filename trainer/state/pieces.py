"""What a piece of the trainer (a task, sampler, teacher or sharing rule) keeps across a resume."""

from __future__ import annotations

from typing import Any


class PieceState:
    """A piece's checkpoint state, under keys of its own: :meth:`client_state` goes into the checkpoint's client
    state (written once, the same on every rank), :meth:`rank_state` into each rank's own file; :meth:`load_state`
    reads both back.  A piece with nothing to keep inherits these."""

    def client_state(self) -> dict[str, Any]:
        return {}

    def rank_state(self) -> dict[str, Any]:
        return {}

    def load_state(self, client: dict[str, Any], rank: dict[str, Any]) -> None:
        """``client`` and ``rank``: the whole client state and this rank's state, as saved."""
