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
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

from trainer.runtime.host_allocator import share_one_arena  # noqa: E402

# Before numpy and torch are imported (they start threads): glibc fixes its arena limit when a second thread first
# allocates.  One arena is the part of engine.keep_freed_host_memory that cannot wait for the config.
share_one_arena()

from trainer.runtime.accelerator import default_to_cpu  # noqa: E402

# Before DeepSpeed is imported (the modules below import it): its accelerator probe warns on every rank of a machine
# that has none.
default_to_cpu()

# Before torch's extension builder is imported (DeepSpeed imports it): on a machine without CUDA it warns, once per
# rank, that it found no CUDA runtime, which is true and asks nothing of anyone.
logging.getLogger("torch.utils.cpp_extension").addFilter(
    lambda record: not record.getMessage().startswith("No CUDA runtime is found")
)

from trainer.runtime.signals import INTERRUPTED_EXIT_CODE  # noqa: E402
from trainer.runtime.sinks import check_packages  # noqa: E402
from typedconfig import ConfigError  # noqa: E402

NON_LEADER_GRACE_S = 10.0
"""How long a rank other than its node's first waits, after a config error that its node's first rank prints, before
it exits too.  The deepspeed launcher ends every rank once one exits with an error: were the silent rank first, the
one that prints could be ended before it printed."""


def _local_rank(local_rank_arg: int | None) -> int:
    """This process's rank on its node, as launchers set it, before the config (and the resolver) is read."""
    for value in (os.environ.get("LOCAL_RANK"), os.environ.get("SLURM_LOCALID"), local_rank_arg):
        try:
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
    return 0


def _load_config(args: argparse.Namespace):
    """The config; a problem in it (the same on every rank) is printed by the first rank of each node only."""
    from trainer.config import load_config_or_exit

    leader = _local_rank(args.local_rank) == 0
    try:
        config = load_config_or_exit(args, print_error=leader)
        try:  # an optional logger turned on without its package: one line, before the heavy imports
            check_packages(config.log)
        except ConfigError as exc:
            if leader:
                print(f"config error: {exc}", file=sys.stderr)
            sys.exit(2)
        return config
    except SystemExit:
        if not leader:
            time.sleep(NON_LEADER_GRACE_S)
        raise


class _Parser(argparse.ArgumentParser):
    """A usage error, the same on every rank, is printed by the first rank of each node only (as a config error)."""

    def error(self, message: str):
        if _local_rank(None) != 0:
            time.sleep(NON_LEADER_GRACE_S)
            self.exit(2)
        super().error(message)


class _InterruptOnce:
    """A signal handler that raises KeyboardInterrupt the first time only: DeepSpeed's launch.py follows a terminal's
    SIGINT with a SIGTERM, which must not interrupt the rank again while it prints its line.  (Setting the handlers
    to SIG_IGN instead makes CPython raise OSError for a SIGTERM already pending.)"""

    def __init__(self) -> None:
        self.fired = False

    def __call__(self, signum, frame) -> None:
        if not self.fired:
            self.fired = True
            raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # A fatal signal in native code (e.g. SIGBUS: a memory-mapped .beton cut while the run reads it) prints
    # every thread's Python stack instead of dying silently.
    faulthandler.enable(all_threads=True)
    # Until the trainer takes them over (then they save), Ctrl-C and SIGTERM, which DeepSpeed's launch.py sends each
    # rank right after a terminal's Ctrl-C, stop the rank with one line: there is nothing to save yet.
    interrupt = _InterruptOnce()
    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(argv)
    except KeyboardInterrupt:  # before training began, or a second Ctrl-C: every rank gets it, one prints
        if _local_rank(None) == 0:
            print("interrupted: stopped without saving (rerun the same command to resume)", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(argv: list[str] | None) -> int:
    from trainer.config import add_config_arguments

    parser = _Parser(prog="trainer/run.py", description="Train an AlphaNet supernet with the sandwich rule.")
    add_config_arguments(parser)
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although the config differs from the run's config.yaml (changes go to config_changes.jsonl)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = _load_config(args)

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
        results = trainer.train()
    except (TrainingStopped, CheckpointError, DataError) as exc:
        trainer.close(failed=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, DataError) else 3
    except BaseException:
        trainer.close(failed=True)  # no barrier: the traceback prints now and the process exits non-zero
        raise
    trainer.close()
    return results.get("exit_code", 0)  # stopped on a request and saved: 130 after Ctrl-C, else 0


if __name__ == "__main__":
    sys.exit(main())
