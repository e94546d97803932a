"""Training entry point: ``deepspeed trainer/run.py --config configs/X.yaml [--set key=value ...]``.

Also runs under ``torchrun``, ``srun`` and as a plain ``python trainer/run.py``.  Rerunning the same
command resumes from the newest committed checkpoint of the run folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts trainer/ first on sys.path: put the repository root there instead, so that
# module names in trainer/ cannot shadow packages and the project's packages import from this checkout.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE)]

import argparse  # noqa: E402
import faulthandler  # noqa: E402

from trainer.runtime.host_allocator import share_one_arena  # noqa: E402

# Before numpy and torch are imported (they start threads): glibc fixes its arena limit when a second thread first
# allocates.  One arena is the part of engine.keep_freed_host_memory that cannot wait for the config.
share_one_arena()

from trainer.config import add_config_arguments, load_config_or_exit  # noqa: E402
from trainer.runtime.sinks import check_packages  # noqa: E402
from typedconfig import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    # A fatal signal in native code (e.g. SIGBUS: a memory-mapped .beton cut while the run reads it) prints
    # every thread's Python stack instead of dying silently.
    faulthandler.enable(all_threads=True)
    parser = argparse.ArgumentParser(
        prog="trainer/run.py", description="Train an AlphaNet supernet with the sandwich rule."
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although the config differs from the run's config.yaml (changes go to config_changes.jsonl)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = load_config_or_exit(args)
    try:  # an optional logger turned on without its package: one line, before the heavy imports
        check_packages(config.log)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    from data_pipeline import DataError
    from trainer.loop import Trainer, TrainingStopped
    from trainer.run_folder import RunFolderError
    from trainer.runtime.distributed import DistributedEnvError
    from trainer.state.checkpoint import CheckpointError

    try:
        trainer = Trainer(config, local_rank_arg=args.local_rank, allow_config_change=args.allow_config_change)
    except (DataError, DistributedEnvError, CheckpointError, TrainingStopped, RunFolderError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        trainer.train()
    except (TrainingStopped, CheckpointError, DataError) as exc:
        trainer.close(failed=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, DataError) else 3
    except BaseException:
        trainer.close(failed=True)  # no barrier: the traceback prints now and the process exits non-zero
        raise
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
