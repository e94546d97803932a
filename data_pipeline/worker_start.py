"""How data workers are started: forked by a fork server, never by a training process that runs threads.

A process forked while another of its threads is creating or deleting its Python thread state can hang
before it runs a line: CPython before 3.11.8 and 3.12.1 (gh-112275) leaves the child waiting for ever on a lock
that thread held at the fork.  A rank runs such threads (its loaders' queue feeders, TensorBoard's writer)
and starts workers often (each loader's first epoch, each BatchNorm calibration, which stops early and ends
its workers); seen in CI on Python 3.11.7: a rank's new validation worker hung in ``PyOS_AfterFork_Child``,
the other rank waited for ever in the all-reduce of the accuracy counts.  A fork server is one process
started by fork + exec, which runs no other thread, and forks each worker from itself; the worker receives
the dataset pickled.

The server imports :mod:`data_pipeline._fork_server` first: torch and the backends (workers start with them
loaded), and the signals SLURM sends to every process of a job step (SIGTERM, SIGUSR1) and Ctrl-C's SIGINT set
aside while the parent lives, as the workers do (``wds_backend._init_worker``): a rank still reads batches after them (it
saves at the next step boundary).

Neither outlives its parent.  Each asks the kernel for SIGKILL when its parent ends (``PR_SET_PDEATHSIG``:
the fork server when the rank thread that started it ends, a worker when the fork server ends), then checks
that the parent has not ended already (the race between the fork and that request); a SIGTERM, SIGUSR1 or SIGINT
that finds the parent gone ends the process.  Without this, a rank killed with SIGKILL left both running for
as long as the machine lived: each worker holds the fork server's "alive" pipe open, and a worker's
DataLoader watchdog looks at the fork server, not at the rank.  Loaders are iterated by the main thread
(the fork server starts with the first worker and dies with the thread that started it).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.context
import os
import signal
import sys

PRELOAD = "data_pipeline._fork_server"
PARENT_ENV = "DATA_PIPELINE_FORK_SERVER_PARENT"
"""The pid of the process that starts the fork server, for the server's check that its parent still lives."""
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""What SLURM sends to every process of a job step, and Ctrl-C to every process of the terminal's group."""


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent (``parent``, a pid) ends; exit now if it has
    ended already.  Linux only."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    if os.getppid() != parent:  # ended before the request: no signal will come
        os._exit(1)


def stay_unless_orphaned(parent: int) -> None:
    """SIGTERM, SIGUSR1 and SIGINT end this process only when ``parent`` is no longer its parent; otherwise they are
    set aside (the parent, a rank or the fork server, handles them and ends this process when it is done)."""

    def handler(signum, frame) -> None:
        if os.getppid() != parent:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


def worker_context() -> multiprocessing.context.BaseContext | None:
    """The multiprocessing context DataLoader workers are started from (None: the platform's default, where
    there is no fork server)."""
    if sys.platform != "linux":
        return None
    os.environ[PARENT_ENV] = str(os.getpid())  # read by the fork server this process starts
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([PRELOAD])  # read when the server starts: the first worker of the process
    return context
