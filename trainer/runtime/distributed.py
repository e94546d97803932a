"""One resolver for the process environment: SLURM, then torchrun / deepspeed launcher, then single process.

It returns rank, world size, local rank and the rendezvous address, and fails with a clear message
when an environment is half set (a common cause of silent hangs on clusters).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

DEFAULT_PORT = 29500


class DistributedEnvError(RuntimeError):
    """The environment names some but not all of what a launcher must set, or its rendezvous port is taken."""


@dataclass(frozen=True, slots=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str
    """Where it came from: slurm | launcher | single."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export(self) -> None:
        """Set the variables torch.distributed's env:// rendezvous reads."""
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as exc:
        raise DistributedEnvError(f"{key}={env[key]!r} is not an integer") from exc


def port_for_job(job_id: int) -> int:
    """The rendezvous port of a SLURM job: the one rule (the sbatch templates leave it to the resolver), the
    same on every node of the job, different for jobs that share a node."""
    return DEFAULT_PORT + job_id % 20000


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list (``node[01-04,07]`` → ``node01``): ``scontrol show hostnames`` when
    it is installed (it knows every node-list form), else :func:`parse_first_host`."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return parse_first_host(nodelist)


def parse_first_host(nodelist: str) -> str:
    """First host of the common node-list forms (``a``, ``a,b``, ``node[01-04,07]``), without scontrol."""
    match = re.match(r"^([^\[,]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise DistributedEnvError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def resolve(env: Mapping[str, str] | None = None, local_rank_arg: int | None = None) -> DistEnv:
    """Rank/world/local rank/master from the environment (see module docstring for the order)."""
    env = dict(os.environ if env is None else env)
    launcher_keys = ("RANK", "WORLD_SIZE")
    in_slurm_step = "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env
    if in_slurm_step and not all(k in env for k in launcher_keys):
        missing = [k for k in ("SLURM_LOCALID", "SLURM_JOB_NODELIST") if k not in env]
        if missing:
            raise DistributedEnvError(f"SLURM task environment without {missing}: launch each task with srun")
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        master = env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"])
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        else:
            port = port_for_job(_int(env, "SLURM_JOB_ID")) if "SLURM_JOB_ID" in env else DEFAULT_PORT
        return _checked(DistEnv(rank, world, _int(env, "SLURM_LOCALID"), master, port, "slurm"))
    present = [k for k in launcher_keys if k in env]
    if present:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise DistributedEnvError(f"launcher environment has {present} but not {missing}")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else local_rank_arg
        if local is None:
            raise DistributedEnvError("launcher environment has no LOCAL_RANK and no --local_rank was passed")
        return _checked(
            DistEnv(
                _int(env, "RANK"),
                _int(env, "WORLD_SIZE"),
                local,
                env["MASTER_ADDR"],
                _int(env, "MASTER_PORT"),
                "launcher",
            )
        )
    if local_rank_arg not in (None, 0, -1):
        raise DistributedEnvError(f"--local_rank={local_rank_arg} given but no RANK/WORLD_SIZE in the environment")
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port()
    return DistEnv(0, 1, 0, "127.0.0.1", port, "single")


def free_port() -> int:
    """A TCP port nobody listens on now: a single process (which still rendezvous with itself) must not
    collide with another single-process run on the same machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checked(dist_env: DistEnv) -> DistEnv:
    if dist_env.world_size < 1 or not 0 <= dist_env.rank < dist_env.world_size:
        raise DistributedEnvError(f"rank {dist_env.rank} is outside world size {dist_env.world_size}")
    if dist_env.local_rank < 0:
        raise DistributedEnvError(f"local rank {dist_env.local_rank} is negative")
    return dist_env


def init_distributed(env: DistEnv, timeout_s: float) -> torch.device:
    """Export ``env``, start the process group (NCCL on GPUs, gloo on CPU) whose collectives give up after
    ``timeout_s`` seconds, and return this rank's device."""
    import deepspeed

    env.export()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
    printed = io.StringIO()  # on CPU, DeepSpeed prints that it built its shared-memory all-reduce, once per rank
    try:
        with contextlib.redirect_stdout(printed):
            deepspeed.init_distributed(
                dist_backend="nccl" if use_cuda else "gloo",
                auto_mpi_discovery=False,
                timeout=timedelta(seconds=timeout_s),
            )
    except BaseException as exc:
        message = str(exc)
        if not isinstance(exc, RuntimeError) or (
            "EADDRINUSE" not in message and "address already in use" not in message.lower()
        ):
            sys.stdout.write(printed.getvalue())  # what it printed may explain the failure
            raise
        raise DistributedEnvError(  # torch's DistNetworkError is a RuntimeError
            f"port {env.master_port} on {env.master_addr} is in use (another run on this machine?): give this run "
            "another, e.g. deepspeed --master_port 29600 ... (torchrun: --master-port; plain python: MASTER_PORT=)"
        ) from None
    if not use_cuda:  # one rank too: the deepspeed launcher's --num_gpus 1 sets LOCAL_SIZE=1, and a segment is made
        _release_shared_allreduce_buffer(env)
    return local_device(env)


SHM_DIR = Path("/dev/shm")


def shared_allreduce_buffer(env: DistEnv) -> Path:
    """Where DeepSpeed's CPU shared-memory all-reduce keeps this rank's buffer (the name its ``shm.cpp`` builds
    from the user id, the rendezvous address and port, and the rank)."""
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{env.master_addr}_{env.master_port}_{env.rank}"


def _release_shared_allreduce_buffer(env: DistEnv) -> None:
    """Remove the name of this rank's DeepSpeed shared-memory all-reduce buffer, keeping the memory mapped.

    On CPU, when every rank is on one node and the ``deepspeed`` launcher set ``LOCAL_SIZE``, DeepSpeed maps a
    66 MB segment per rank in /dev/shm and never unlinks it: every run would leave 66 MB of RAM per rank
    behind until the machine reboots (69 runs had taken 8.9 GB of a 24 GB machine).  Once every rank has
    mapped its peers' segments (each does that inside ``init_distributed``, hence the barrier), the names
    are no longer needed; the kernel frees the memory when the last process using it exits, killed or not."""
    import torch.distributed as dist

    dist.barrier()
    shared_allreduce_buffer(env).unlink(missing_ok=True)


def local_device(env: DistEnv) -> torch.device:
    """This rank's device: its local GPU, or the CPU."""
    return torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def local_world_size(env: Mapping[str, str] | None = None) -> int:
    """Processes of this job on this node: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE,
    SLURM's tasks per node (``8`` or ``8(x2)``), else 1."""
    env = os.environ if env is None else env
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        match = re.match(r"^\s*(\d+)", env.get(key, ""))
        if match and int(match.group(1)) > 0:
            return int(match.group(1))
    return 1


def configure_threads(requested: int | None, local_ranks: int) -> int:
    """Set this process's torch thread count: ``requested``, or the cores it may run on ÷ ``local_ranks`` (at
    least 1), so that ranks sharing a node do not oversubscribe it.  Returns the count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = requested or max(1, cores // max(1, local_ranks))
    torch.set_num_threads(threads)
    return threads
