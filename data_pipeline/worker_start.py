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
loaded), and SIGTERM, SIGUSR1 and SIGINT ignored, as the workers do (``wds_backend._init_worker``): SLURM sends
the first two to every process of a job step, Ctrl-C the third to every process of the terminal's group, and a
rank still starts workers after them (it saves at the next step boundary).  It exits when the process that
started it does.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import sys

PRELOAD = "data_pipeline._fork_server"


def worker_context() -> multiprocessing.context.BaseContext | None:
    """The multiprocessing context DataLoader workers are started from (None: the platform's default, where
    there is no fork server)."""
    if sys.platform != "linux":
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([PRELOAD])  # read when the server starts: the first worker of the process
    return context
