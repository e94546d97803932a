"""Imported by the data workers' fork server (:mod:`data_pipeline.worker_start`) before it forks any worker,
and by nothing else: it ignores the signals SLURM sends to a whole job step and Ctrl-C's SIGINT (multiprocessing's
fork server ignores SIGINT itself but restores it in each worker it forks), and loads what every worker needs, so
that each starts with it loaded."""

import signal

for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(signum, signal.SIG_IGN)

import torch  # noqa: E402, F401

import data_pipeline.wds_backend  # noqa: E402, F401
