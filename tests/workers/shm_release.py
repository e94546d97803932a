"""Worker for test_trainer_units: start the process group as the trainer does, all-reduce once, report.

Launched as ``python -m torch.distributed.run --nproc_per_node 2 tests/workers/shm_release.py OUT_DIR`` with
``LOCAL_SIZE=2`` (what the ``deepspeed`` launcher sets), which makes DeepSpeed map its shared-memory buffers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    from trainer.runtime.distributed import init_distributed, resolve, shared_allreduce_buffer
    from trainer.sections import EngineConfig

    env = resolve()
    init_distributed(env, EngineConfig().dist_timeout_s)
    total = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(total)
    report = {
        "shm_op_loaded": ds_comm.cdb.shm_comm_op is not None,
        "own_buffer_listed": shared_allreduce_buffer(env).exists(),
        "sum": total.item(),
    }
    Path(sys.argv[1], f"rank{env.rank}.json").write_text(json.dumps(report))
    # Close the group as the trainer does: a process that exits with gloo's group still open sometimes
    # aborts in its teardown ("terminate called without an active exception", SIGABRT) after its work is done.
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
