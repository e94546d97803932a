"""The trainer's engine under glibc's default ``malloc`` and under the trainer's (``engine.keep_freed_host_memory``):
time per step, kernel time and page faults per step, and the peak resident memory as the steps go on.

    .venv/bin/python -m bench.host_allocator [--space alphanet] [--batch 4] [--steps 60] [--stage 1] [--rounds 1]

The allocator is a setting of the whole process, so each one runs in its own 2-rank process group (gloo, one
torch thread per rank), glibc's defaults first, then the kept memory, ``--rounds`` times in turn; the same
supernet, sandwiches and batches in each.  The engine is DeepSpeed at ``--stage`` (1: the ImageNet recipe's),
stepping as the trainer does (``trainer.runtime.engine.one_reduction``).  Figures are rank 0's: the mean over the
steps after the first, and the high-water mark of its resident memory after each fifth of the steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from bench.common import argument_parser, python_env, torchrun_command

ALLOCATORS = ("glibc-default", "kept")


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--space", default="alphanet")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--stage", type=int, default=1, choices=(0, 1, 2, 3))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--worker", choices=ALLOCATORS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    env = python_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    rows = []
    for _ in range(args.rounds):
        for allocator in ALLOCATORS:
            command = torchrun_command(__spec__.name, 2, "--worker", allocator, "--space", args.space)
            command += ["--batch", str(args.batch)]
            command += ["--steps", str(args.steps), "--stage", str(args.stage)]
            done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
            if done.returncode:
                sys.exit(done.returncode)
            rows.append(json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1]))
    marks = rows[0]["marks"]
    print(
        f"space {args.space}, DeepSpeed ZeRO-{args.stage}, 2 ranks x {args.batch} images x 1 thread, 4 sub-networks "
        f"per step, {args.steps} steps per run; per step on rank 0 (mean after the first); peak RSS of rank 0 "
        f"after steps {', '.join(map(str, marks))}"
    )
    print(f"{'allocator':14s} {'ms/step':>8s} {'kernel ms':>9s} {'faults':>7s}  peak RSS MiB")
    for row in rows:
        print(
            f"{row['allocator']:14s} {row['ms']:8.0f} {row['kernel_ms']:9.0f} {row['faults']:7d}  "
            + " ".join(f"{mib:5d}" for mib in row["peak_mib"])
        )
    mean = {a: sum(r["ms"] for r in rows if r["allocator"] == a) / args.rounds for a in ALLOCATORS}
    print(f"time per step, kept / glibc-default: {mean['kept'] / mean['glibc-default']:.3f}")


def worker(args) -> None:
    from trainer.runtime.host_allocator import keep_freed_memory, share_one_arena

    # before the process group starts its threads (the launcher's OMP_NUM_THREADS=1 spares numpy's BLAS thread)
    if args.worker == "kept" and not (share_one_arena() and keep_freed_memory()):
        raise SystemExit("kept: not glibc, or a thread had its own malloc arena already")
    import torch.distributed as dist

    from bench.engines import (
        deepspeed,
        fresh_engine,
        model_config,
        peak_rss_bytes,
        random_batch,
        sandwich_step,
        start_ranks,
        timed_step,
    )
    from models import ArchSampler
    from trainer.samplers import sample_sandwich

    env, _ = start_ranks()
    torch.set_num_threads(1)
    config = model_config(args.space)

    def make(net):
        return deepspeed(net, micro_batch=args.batch, world_size=env.world_size, zero_stage=args.stage)

    engine, module, _, reduction = fresh_engine(make, config, {})
    sandwich = sandwich_step()
    sampler, gen = ArchSampler(module.space, seed=0), torch.Generator().manual_seed(env.rank)
    res = max(module.space.resolutions)
    marks = sorted({max(1, round(args.steps * k / 5)) for k in range(1, 6)})
    wall = kernel = 0.0
    faults, peaks = 0, []
    for step in range(1, args.steps + 1):
        images, labels = random_batch(args.batch, res, config.num_classes, gen)
        subnets = sample_sandwich(module.space, sampler, 4)
        seconds, kernel_s, minor_faults = timed_step(engine, module, reduction, sandwich, subnets, images, labels)
        if step > 1:  # the first step is a warm-up
            wall += seconds
            kernel += kernel_s
            faults += minor_faults
        if step in marks:
            peaks.append(peak_rss_bytes() // 2**20)
    timed = max(1, args.steps - 1)
    if env.rank == 0:
        row = {"allocator": args.worker, "ms": 1e3 * wall / timed, "kernel_ms": 1e3 * kernel / timed}
        print(json.dumps({**row, "faults": faults // timed, "marks": marks, "peak_mib": peaks}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
