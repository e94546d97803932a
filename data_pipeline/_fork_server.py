"""Imported by the data workers' fork server (:mod:`data_pipeline.worker_start`) before it forks any worker,
and by nothing else: it ignores the signals SLURM sends to a whole job step, and loads what every worker
needs, so that each starts with it loaded."""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)

import torch  # noqa: E402, F401

import data_pipeline.wds_backend  # noqa: E402, F401
