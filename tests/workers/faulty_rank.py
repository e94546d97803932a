"""Worker for tests/trainer/test_fault_checkpoints.py: ``trainer/run.py`` with one injected fault on one rank.

    deepspeed --num_gpus 2 tests/workers/faulty_rank.py FAULT RANK STEP --config ... --set ...

FAULT is ``none``; ``raise`` (the rank raises in its training step STEP); ``disk_full`` (the rank's write
of its trainer state for the checkpoint at STEP fails with ENOSPC); or ``kill_in_save`` (the rank is
SIGKILLed while the model states of STEP are half written).  Other ranks run unchanged; without a
launcher it runs as one plain process (rank 0).  The repository must be on ``PYTHONPATH`` (the test sets it).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path


def inject(fault: str, rank: int, step: int) -> None:
    import torch

    from trainer import loop
    from trainer.state import checkpoint

    if fault == "none" or int(os.environ.get("RANK", "0")) != rank:
        return
    if fault == "raise":
        train_step = loop.Trainer.train_step

        def failing_step(self, batches):
            if self.global_step + 1 == step:
                raise RuntimeError(f"injected failure on rank {rank} at step {step}")
            return train_step(self, batches)

        loop.Trainer.train_step = failing_step
    elif fault == "disk_full":
        save = torch.save

        def full_disk_save(obj, f, *args, **kwargs):
            if isinstance(f, (str, Path)) and f"trainer_rank{rank}" in str(f) and f"step{step:09d}" in str(f):
                Path(f).write_bytes(b"partial")  # what a full disk leaves behind
                raise OSError(errno.ENOSPC, "No space left on device")
            return save(obj, f, *args, **kwargs)

        checkpoint.torch.save = full_disk_save  # torch.save of this process; only that one file fails
    elif fault == "kill_in_save":
        save = torch.save

        def killed_mid_write(obj, f, *args, **kwargs):
            if "model_states" in str(f) and f"step{step:09d}" in str(f):
                Path(f).write_bytes(b"half a file")
                os.kill(os.getpid(), signal.SIGKILL)
            return save(obj, f, *args, **kwargs)

        checkpoint.torch.save = killed_mid_write
    else:
        raise SystemExit(f"unknown fault {fault}")


if __name__ == "__main__":
    fault, rank, step, *rest = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher's
    inject(fault, int(rank), int(step))
    from trainer.run import main

    sys.exit(main(rest))
