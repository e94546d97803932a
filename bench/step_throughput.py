"""Sandwich-step throughput of every engine we can train with, against a plain-PyTorch loop of the same
math and against the reference's own pattern, with 2 processes on CPU (gloo); per-phase profile, peak
memory and optimizer-state memory per rank.

    .venv/bin/python -m bench.step_throughput [--steps 6] [--batch 16] [--space tiny] [--bf16 auto|on|off]

Engines, all running the same 4-sub-network sandwich step (largest on labels, two random and the smallest
distilled from it) on the same batches, one torch thread per rank:

- **reference-style DDP**: the research code's pattern: the supernet wrapped in ``DistributedDataParallel``
  with ``find_unused_parameters=True``, an all-reduce in every sub-network's backward, NCHW, fp32;
- **plain PyTorch**: our math in a hand-written loop: the N backward passes accumulate locally, one flat
  all-reduce of all gradients at the last (averaging over ranks), clip by value, one Nesterov SGD step.
  Also run with the old NCHW layout, with PyTorch's (oneDNN's) depthwise
  convolutions instead of ours (``models.depthwise``), with activation checkpointing and with bf16
  autocast, to show each lever alone.  The bf16 row runs by default only on a CPU with bf16
  instructions (AVX-512 BF16 or AMX), which bf16 autocast is for; on a CPU without them, before depthwise
  layers left autocast (``models.depthwise.runs_in_float32``), PyTorch ran their bf16 convolutions one
  channel at a time, ~15× the fp32 step, and a profiled step recorded over 10 GB of operator events per
  rank; ``--bf16 on`` measures it there anyway, without the profile.  DeepSpeed ZeRO-1 (the ImageNet
  recipe's engine) is also run with bf16 autocast, on the same condition;
- **DeepSpeed ZeRO-0..3**: the engine ``trainer/run.py`` trains with (``trainer.runtime.engine.build_engine``).

Every engine is measured twice, all of them in order and then all in reverse order, and the mean of its two
measurements is its samples/s: a drift of the machine's speed over the run, which on a shared machine is
larger than some of the differences measured, then moves no engine's figure against another's.  Ratios are
samples/s against the plain loop and against the reference-style step, median of the timed steps after one
warm-up step.  The profile is one extra step under ``torch.profiler`` per engine:
forward, backward (with whatever hooks the engine runs in it), the optimizer-step call (DeepSpeed: with
its reductions and bookkeeping) and, inside those, the time collectives were in flight and the time of
the optimizer's own update.  Peak RSS is the rank's high-water mark while that engine ran (reset with
``/proc/self/clear_refs`` before each engine; Linux).

``--paired "plain PyTorch" "DeepSpeed ZeRO-1" ...`` measures the named engines side by side instead: all built
at once, every step's sandwich and batch run by each in turn, for ratios that the machine's drift cannot
move (no profile, no memory figures).  It can also name ``ZeRO-1, DeepSpeed defaults`` (and 2, 3): the stage
with DeepSpeed's own ``contiguous_gradients`` and a reduction after every backward pass, which the trainer
changes (``engine.contiguous_gradients``, ``engine.coalesce_grad_reduction``), and ``plain PyTorch, pinned``:
the plain loop with each rank's thread held on a core of its own during its steps (thread placement; the
trainer does not pin), and ``ZeRO-3, block gather``: ZeRO-3 gathering each block's parameters before it runs
rather than the whole network's (``engine.zero3_gather: block``).  It also prints the kernel time and minor
page faults of each engine's steps on rank 0.

``--allocator kept`` (the default) sets each rank's ``malloc`` as the trainer does
(``engine.keep_freed_host_memory``: freed memory kept for the next step); ``--allocator glibc-default`` leaves
glibc's defaults, under which the large tensors of every step are mapped afresh and faulted in again.  It is
process-wide, so every engine of a run (the reference-style step too) runs under the same allocator.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import argument_parser, module_command, python_env, torchrun_command
from bench.engines import (
    PlainEngine,
    deepspeed,
    fresh_engine,
    model_config,
    peak_rss_bytes,
    plain,
    random_batch,
    reset_peak_rss,
    sandwich_step,
    start_ranks,
    timed_step,
)

COLLECTIVES = ("all_reduce", "allreduce", "reduce_scatter", "all_gather", "allgather", "broadcast")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX-512 BF16 or AMX), from /proc/cpuinfo (Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the SGD momentum buffers this rank holds (ZeRO 1–3 keep only their partition's)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(
        v.numel() * v.element_size() for state in inner.state.values() for v in state.values() if torch.is_tensor(v)
    )


class Phases:
    """Engine interface that names the phases of a step for the profiler (``record_function``)."""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, x):
        with torch.profiler.record_function("phase: forward"):
            return self.engine(x)

    def backward(self, loss):
        with torch.profiler.record_function("phase: backward"):
            self.engine.backward(loss)

    def step(self):
        with torch.profiler.record_function("phase: step"):
            self.engine.step()

    def set_gradient_accumulation_boundary(self, boundary):
        self.engine.set_gradient_accumulation_boundary(boundary)

    def train(self):
        self.engine.train()


def phase_breakdown(prof) -> dict[str, float]:
    """Milliseconds per phase of one profiled step: forward, backward and step (the main thread's ranges),
    optimizer (the optimizer's own ``step``, wherever called) and collectives (time in flight on any thread;
    they run inside backward or step and may overlap computation)."""
    totals = {"forward": 0.0, "backward": 0.0, "step": 0.0, "optimizer": 0.0, "collectives": 0.0}
    spans: list[tuple[int, int]] = []
    for event in prof.events():
        name = event.name
        duration = (event.time_range.end - event.time_range.start) / 1e3
        if name.startswith("phase: "):
            totals[name[7:]] += duration
        elif name.startswith("Optimizer.step#"):
            totals["optimizer"] += duration
        elif any(c in name.lower() for c in COLLECTIVES) and not name.startswith(("c10d::", "aten::")):
            spans.append((event.time_range.start, event.time_range.end))
    # union of the collectives' intervals, so nested records of one collective count once
    end = -1
    for start, stop in sorted(spans):
        if start >= end:
            totals["collectives"] += (stop - start) / 1e3
            end = stop
        elif stop > end:
            totals["collectives"] += (stop - end) / 1e3
            end = stop
    return totals


def top_ops(prof, count: int) -> list[tuple[str, float, int]]:
    """The ``count`` operators with the most self CPU time: (name, ms, calls)."""
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in rows[:count]]


class ReferenceDDPEngine(PlainEngine):
    """The reference's pattern: DDP with ``find_unused_parameters``, so every backward all-reduces."""

    def __init__(self, net, optimizer):
        super().__init__(torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True), optimizer)

    def backward(self, loss):
        loss.backward()  # DDP's hooks all-reduce (average) this backward's gradients


def worker(args) -> None:
    import torch.distributed as dist

    from models import ArchSampler
    from models.depthwise import pytorch_depthwise
    from trainer.runtime.collectives import all_reduce_
    from trainer.runtime.host_allocator import keep_freed_memory, share_one_arena
    from trainer.samplers import sample_sandwich

    # before the process group starts its threads (the launcher's OMP_NUM_THREADS=1 spares numpy's BLAS thread)
    if args.allocator == "kept":
        shared = share_one_arena()
        if not keep_freed_memory():
            args.allocator = "glibc-default (no glibc here)"
        elif not shared:
            args.allocator = "kept, but threads in arenas of their own"
    env, _ = start_ranks()
    torch.set_num_threads(1)
    config = model_config(args.space)
    world = dist.get_world_size()

    def run(engine, module, reduction, *, bf16_autocast: bool = False, profile: bool = True) -> dict:
        """Timed steps, then one profiled step (``profile``); ``reduction()`` is the context of a step's backward
        passes (``trainer.runtime.engine.one_reduction`` for DeepSpeed, as the trainer steps)."""
        sandwich = sandwich_step(bf16_autocast=bf16_autocast)
        sampler = ArchSampler(module.space, seed=0)
        gen = torch.Generator().manual_seed(env.rank)
        res = max(module.space.resolutions)

        def one_step(eng) -> tuple[float, float, float]:
            images, labels = random_batch(args.batch, res, config.num_classes, gen)
            dist.barrier()
            start = time.perf_counter()
            eng.train()
            with reduction():
                sandwich(eng, module, sample_sandwich(module.space, sampler, 4), images, labels)
            middle = time.perf_counter()
            eng.step()
            dist.barrier()
            end = time.perf_counter()
            return start, middle, end

        rates, passes, steps = [], [], []
        for step in range(args.steps + 1):
            start, middle, end = one_step(engine)
            if step:  # the first step is a warm-up
                rates.append(args.batch * world / (end - start))
                passes.append(1e3 * (middle - start))
                steps.append(1e3 * (end - middle))
        median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        result = {"rate": median(rates), "passes_ms": median(passes), "step_ms": median(steps), "phases": None}
        if profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                start, _, end = one_step(Phases(engine))
            result["phases"] = {**phase_breakdown(prof), "total": 1e3 * (end - start)}
            result["top"] = top_ops(prof, args.top)
        return result

    def measure(name: str, make, *, profile: bool = True, **options) -> None:
        """Build one engine from fresh weights (:func:`fresh_engine`), run it, record; a second measurement of
        the same engine is added to the first one's."""
        reset_peak_rss()
        engine, module, optimizer, reduction = fresh_engine(make, config, options)
        with pytorch_depthwise() if options.pop("onednn_depthwise", False) else contextlib.nullcontext():
            result = run(engine, module, reduction, profile=profile, **options)
        result["state_bytes"] = optimizer_state_bytes(optimizer)
        peak = torch.tensor([peak_rss_bytes()], dtype=torch.float64)
        all_reduce_(peak, dist.ReduceOp.MAX)
        result["peak_rss"] = float(peak)
        result["rates"] = [result["rate"]]
        if name in results:  # the second pass: the mean of both measurements, the larger peak
            first = results[name]
            result["rates"] = first["rates"] + result["rates"]
            result["rate"] = sum(result["rates"]) / 2
            for key in ("passes_ms", "step_ms"):
                result[key] = (first[key] + result[key]) / 2
            result["peak_rss"] = max(first["peak_rss"], result["peak_rss"])
            result["phases"], result["top"] = first["phases"], first.get("top")
        results[name] = result
        if env.rank == 0:
            print(f"  measured {name}: {result['rates'][-1]:.2f} samples/s", flush=True)

    def reference(net):
        built = plain(net)
        return built._replace(engine=ReferenceDDPEngine(net, built.optimizer))

    def deepspeed_stage(stage, **trainer_options):
        def make(net):
            return deepspeed(
                net, micro_batch=args.batch, world_size=env.world_size, zero_stage=stage, **trainer_options
            )

        return make

    results: dict[str, dict] = {}
    engines = [
        ("plain PyTorch", plain, {}),
        ("reference-style DDP, NCHW", reference, {"channels_last": False}),
        ("plain PyTorch, NCHW", plain, {"channels_last": False}),
        ("plain, oneDNN depthwise", plain, {"onednn_depthwise": True}),
        ("plain + activation ckpt", plain, {"activation_checkpointing": True}),
    ]
    native_bf16 = cpu_has_bf16()
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16)
    if bf16:
        engines.append(("plain + bf16 autocast", plain, {"bf16_autocast": True, "profile": native_bf16}))
    elif env.rank == 0:
        print("  skipped the bf16-autocast rows: no bf16 instructions on this CPU (--bf16 on to run them)", flush=True)
    engines += [(f"DeepSpeed ZeRO-{stage}", deepspeed_stage(stage), {}) for stage in (0, 1, 2, 3)]
    if bf16:  # the engine of the ImageNet recipe, as a user would switch bf16 on
        engines.append(("ZeRO-1 + bf16 autocast", deepspeed_stage(1), {"bf16_autocast": True, "profile": native_bf16}))
    if args.paired:  # also DeepSpeed's own defaults, which the trainer changes (``engine.contiguous_gradients``...)
        defaults = {"contiguous_gradients": True, "coalesce_grad_reduction": False}
        engines += [(f"ZeRO-{s}, DeepSpeed defaults", deepspeed_stage(s, **defaults), {}) for s in (1, 2, 3)]
        engines.append(("plain PyTorch, pinned", plain, {"pinned": True}))
        engines.append(("ZeRO-3, block gather", deepspeed_stage(3, zero3_gather="block"), {}))
        paired(args, env, engines, config)
        dist.barrier()
        dist.destroy_process_group()
        return
    # Every engine twice, in this order and then in reverse: a drift of the machine's speed over the run
    # (linear in time) moves both measurements of an engine in opposite directions, and their mean cancels it.
    for name, make, options in engines:
        measure(name, make, **options)
    for name, make, options in reversed(engines):
        measure(name, make, **{**options, "profile": False})
    if env.rank == 0:
        report(args, results)
    dist.barrier()
    dist.destroy_process_group()  # as the trainer does (an open gloo group can abort the exit)


@contextlib.contextmanager
def pinned_to_own_core(pinned: bool):
    """While ``pinned``, this thread runs on one core of those it may use, chosen by its local rank (rank 0 on the
    first, rank 1 on the second...), so the ranks never share or swap cores; the previous affinity afterwards."""
    if not pinned or not hasattr(os, "sched_setaffinity"):
        yield
        return
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[int(os.environ.get("LOCAL_RANK", 0)) % len(cores)]})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)


def paired(args, env, engines, config) -> None:
    """``--paired``: the named engines built side by side, and every sandwich and batch run by each of them in
    turn (in the listed order, then reversed for the next step), so that a change of the machine's speed hits
    them alike; prints each engine's mean step time over the timed steps and its ratio to the first engine
    named.  No profile and no memory figures (the engines share the process)."""
    import torch.distributed as dist

    from models import ArchSampler
    from models.depthwise import pytorch_depthwise
    from trainer.samplers import sample_sandwich

    table = {name: (make, options) for name, make, options in engines}
    names = args.paired
    unknown = [name for name in names if name not in table]
    if unknown:
        raise SystemExit(f"--paired: unknown engine(s) {unknown}; engines: {list(table)}")
    built = {}
    for name in names:
        make, options = table[name][0], dict(table[name][1])
        engine, module, _, reduction = fresh_engine(make, config, options)
        sandwich = sandwich_step(bf16_autocast=options.get("bf16_autocast", False))
        built[name] = (
            engine,
            module,
            reduction,
            sandwich,
            options.get("onednn_depthwise", False),
            options.get("pinned"),
        )
    space = built[names[0]][1].space
    sampler, gen = ArchSampler(space, seed=0), torch.Generator().manual_seed(env.rank)
    res = max(space.resolutions)
    totals, kernel, faults = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
    for step in range(args.steps + 1):  # the first step is a warm-up
        images, labels = random_batch(args.batch, res, config.num_classes, gen)
        subnets = sample_sandwich(space, sampler, 4)
        for name in names if step % 2 == 0 else names[::-1]:
            engine, module, reduction, sandwich, onednn, pinned = built[name]
            with pytorch_depthwise() if onednn else contextlib.nullcontext(), pinned_to_own_core(pinned):
                seconds, kernel_s, minor_faults = timed_step(
                    engine, module, reduction, sandwich, subnets, images, labels
                )
            if step:
                totals[name] += seconds
                kernel[name] += kernel_s
                faults[name] += minor_faults
    if env.rank == 0:
        print(
            f"\nspace {args.space}, 2 ranks x {args.batch} images x 1 thread, 4 sub-networks per step; {args.steps} "
            "timed steps after a warm-up, each sandwich and batch run by every engine in turn (order alternating); "
            f"allocator: {args.allocator}; kernel time and minor page faults per step on rank 0"
        )
        print(f"{'engine':27s} {'ms/step':>8s} {'samples/s':>9s} {'kernel ms':>9s} {'faults':>7s} {'x ' + names[0]:>s}")
        for name in names:
            ms = 1e3 * totals[name] / args.steps
            rate = args.batch * dist.get_world_size() / (ms / 1e3)
            print(
                f"{name:27s} {ms:8.0f} {rate:9.2f} {1e3 * kernel[name] / args.steps:9.0f} "
                f"{faults[name] // args.steps:7d} {totals[names[0]] / totals[name]:.3f}"
            )


def report(args, results: dict[str, dict]) -> None:
    base = results["plain PyTorch"]["rate"]
    reference = results["reference-style DDP, NCHW"]["rate"]
    base_state = results["plain PyTorch"]["state_bytes"]
    print()
    print(
        f"space {args.space}, 2 ranks x {args.batch} images x 1 thread, 4 sub-networks per step, median of "
        f"{args.steps} steps; channels-last unless marked NCHW; every engine measured twice, in order and then in "
        f"reverse order (the two samples/s in brackets), and their mean used; allocator: {args.allocator}"
    )
    header = (
        f"{'engine':27s} {'samples/s':>9s} {'(1st, 2nd)':>16s} {'x plain':>7s} {'x ref':>6s} {'fwd+bwd ms':>10s} "
        f"{'step ms':>8s} {'peak RSS MiB':>12s} {'momentum MiB':>12s}"
    )
    print(header)
    for name, r in results.items():
        print(
            f"{name:27s} {r['rate']:9.2f} {'(' + ', '.join(f'{x:.2f}' for x in r['rates']) + ')':>16s} "
            f"{r['rate'] / base:7.2f} {r['rate'] / reference:6.2f} {r['passes_ms']:10.0f} {r['step_ms']:8.0f} {r['peak_rss'] / 2**20:12.0f} {r['state_bytes'] / 2**20:8.1f} "
            f"(x{r['state_bytes'] / max(base_state, 1):.2f})"
        )
    print()
    print("profile of one step, ms on rank 0 (collectives and optimizer are inside backward / step):")
    print(
        f"{'engine':27s} {'total':>7s} {'forward':>8s} {'backward':>9s} {'step':>7s} {'optimizer':>10s} {'collectives':>12s}"
    )
    for name, r in results.items():
        p = r["phases"]
        if p is None:
            print(f"{name:27s} (not profiled)")
            continue
        print(
            f"{name:27s} {p['total']:7.0f} {p['forward']:8.0f} {p['backward']:9.0f} {p['step']:7.0f} "
            f"{p['optimizer']:10.0f} {p['collectives']:12.0f}"
        )
    for name in ("reference-style DDP, NCHW", "plain PyTorch", "plain + bf16 autocast", "DeepSpeed ZeRO-1"):
        if results.get(name, {}).get("phases") is None:
            continue
        print()
        print(f"top operators by self CPU time, {name} (ms, calls):")
        for op, ms, calls in results[name]["top"]:
            print(f"  {op[:60]:60s} {ms:9.1f} {calls:6d}")


def activation_memory(args) -> None:
    """Print the peak RSS of one forward + backward of the largest sub-network at ``--batch`` in this fresh
    process (one thread), with its activations stored or recomputed (``--activations``)."""
    from models import build_supernet

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = build_supernet(model_config(args.space))
    net.activation_checkpointing = args.activations == "recomputed"
    net.set_arch(net.space.largest())
    res = max(net.space.resolutions)
    images = torch.randn(args.batch, 3, res, res)
    net.train()(images[:1]).logsumexp(1).mean().backward()  # warm-up: lazy imports and one-off allocations
    net.zero_grad(set_to_none=False)  # the gradients exist before the measured pass, as in training
    reset_peak_rss()
    before = peak_rss_bytes()
    net.train()(images).logsumexp(1).mean().backward()
    print(f"{(peak_rss_bytes() - before) / 2**20:.0f}")


def report_activation_memory(args) -> None:
    """Activation checkpointing's saving, each case in its own process so that neither inherits the other's
    high-water mark or allocator pages."""
    peaks = {}
    for case in ("stored", "recomputed"):
        command = module_command(__spec__.name, "--memory", "--activations", case, "--space", args.space)
        command += ["--batch", str(args.batch)]
        done = subprocess.run(command, capture_output=True, text=True, env=python_env(OMP_NUM_THREADS="1"))
        peaks[case] = float(done.stdout.split()[-1]) if done.returncode == 0 else float("nan")
    print(
        f"\nactivation memory: one forward + backward of the largest sub-network at batch {args.batch} raised the "
        f"peak RSS by {peaks['stored']:.0f} MiB with activations stored, {peaks['recomputed']:.0f} MiB with "
        f"activation checkpointing ({peaks['recomputed'] / peaks['stored']:.2f}x)"
    )


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--top", type=int, default=8, help="operators listed per profiled engine")
    parser.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="the bf16-autocast engine: auto = only on a CPU with bf16 instructions (AVX-512 BF16 / AMX)",
    )
    parser.add_argument(
        "--paired",
        nargs="+",
        metavar="ENGINE",
        help="engine names (as printed, each quoted), run side by side on the same steps; ratios to the first",
    )
    parser.add_argument(
        "--allocator",
        choices=("kept", "glibc-default"),
        default="kept",
        help="each rank's malloc: kept = engine.keep_freed_host_memory, as the trainer runs (default)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--activations", choices=("stored", "recomputed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.memory:
        activation_memory(args)
        return
    env = python_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = torchrun_command(__spec__.name, 2, "--worker", "--steps", str(args.steps), "--batch", str(args.batch))
    command += ["--space", args.space]
    command += ["--top", str(args.top), "--bf16", args.bf16, "--allocator", args.allocator] + (
        ["--paired", *args.paired] if args.paired else []
    )
    returncode = subprocess.run(command, env=env).returncode
    if returncode == 0 and not args.paired:
        report_activation_memory(args)
    sys.exit(returncode)


if __name__ == "__main__":
    main()
