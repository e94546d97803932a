"""Imported by the data workers' fork server (:mod:`data_pipeline.worker_start`) before it forks any worker,
and by nothing else: it ties the server and every worker it forks to their parent's life, sets aside the
signals SLURM sends to a whole job step and Ctrl-C's SIGINT while that parent lives, and loads what every worker needs, so that
each starts with it loaded."""

import os

from data_pipeline.worker_start import PARENT_ENV, die_with_parent, stay_unless_orphaned

_rank = int(os.environ.get(PARENT_ENV) or os.getppid())
die_with_parent(_rank)
stay_unless_orphaned(_rank)
_server = os.getpid()
_forking = [0]
"""The pid of the process about to fork (the hooks below are inherited by the workers too)."""


def _before_fork() -> None:
    _forking[0] = os.getpid()


def _worker_forked() -> None:
    """In each worker the server forks, before it runs a line of its own: it dies with the fork server."""
    if _forking[0] == _server:  # not a child of a worker's own fork
        die_with_parent(_server)
        stay_unless_orphaned(_server)


os.register_at_fork(before=_before_fork, after_in_child=_worker_forked)

import torch  # noqa: E402, F401

import data_pipeline.wds_backend  # noqa: E402, F401
