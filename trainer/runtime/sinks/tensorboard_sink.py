"""TensorBoard event files under ``RUN/tensorboard/``."""

from __future__ import annotations

from pathlib import Path


class TensorBoardSink:
    def __init__(self, run_dir: Path, *, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events of steps after the checkpoint a resume starts from (a killed run's) are hidden
        self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)

    def close(self, *, failed: bool = False) -> None:
        self._writer.close()
