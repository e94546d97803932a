"""Per-step wall time of the training loop, split into waiting for data and the step itself."""

from __future__ import annotations

import time

import torch


class StepTiming:
    """Per-step wall time split into waiting for the loader and the step itself, averaged over a log window
    (as tensors, so the log reports the mean over ranks)."""

    def __init__(self) -> None:
        self.wait = self.step = 0.0
        self.steps = 0
        self._mark = time.perf_counter()

    def waiting(self) -> None:
        self._mark = time.perf_counter()

    def batches_ready(self) -> None:
        now = time.perf_counter()
        self.wait += now - self._mark
        self._mark = now

    def step_done(self) -> None:
        self.step += time.perf_counter() - self._mark
        self.steps += 1

    def window(self) -> dict[str, torch.Tensor]:
        """``time/data_wait_ms`` and ``time/step_ms`` per step since the previous call."""
        n = max(1, self.steps)
        values = {
            "time/data_wait_ms": torch.tensor(1e3 * self.wait / n),
            "time/step_ms": torch.tensor(1e3 * self.step / n),
        }
        self.wait = self.step = 0.0
        self.steps = 0
        return values
