"""Why a run stops early, said the same way on every rank: bad data found by some rank, too many bad steps."""

from __future__ import annotations

from data_pipeline import DataError
from trainer.runtime.ranks import problems_of_all_ranks


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); the message says where to resume from."""


def _last(checkpointer, none: str) -> str:
    last = checkpointer.last_tag
    return str(checkpointer.dir / last) if last else none


def bad_data(problem: str | None, *, world: int, step: int, checkpointer) -> DataError:
    """The same DataError on every rank, naming the rank(s) that found a problem (every rank must call this)."""
    return DataError(
        problems_of_all_ranks(problem, world)
        + f" (stopped at step {step}; last committed checkpoint: {_last(checkpointer, 'none')})"
    )


def check_bad_steps(bad_steps: int, limit: int, *, step: int, checkpointer) -> None:
    """TrainingStopped after ``limit`` consecutive skipped steps (non-finite loss or gradient)."""
    if bad_steps >= limit:
        raise TrainingStopped(
            f"{bad_steps} consecutive steps had a non-finite loss or gradient (step {step}); "
            f"last good checkpoint: {_last(checkpointer, 'none yet')}"
        )
