"""Sandwich-step time of the supernet on one GPU: ms per step, images/s, peak GPU memory and the effective
TFLOP/s that ``bench.scaling_model --tflops`` takes, for each engine and precision we train with.

    python -m bench.gpu_step [--space alphanet] [--batch 32 64] [--steps 8]

One process (world size 1, NCCL), so no gradient crosses a link: this is the compute side of a step, what the
scaling model adds communication to.  Engines, all running the trainer's 4-sub-network sandwich step
(``trainer.tasks.sandwich``: largest on labels, two random and the smallest distilled from it, each at its own
resolution) on the same sub-networks and batches:

- **plain PyTorch** (``bench.engines.PlainEngine``): our math in a hand-written loop, channels-last,
  also NCHW, and each with bf16 autocast (``engine.precision: bf16_autocast``);
- **DeepSpeed ZeRO-0..3** (``trainer.runtime.engine.build_engine``, what ``trainer/run.py`` trains with), fp32, and
  ZeRO-1 with bf16 autocast and with bf16 weights (``engine.precision: bf16``, DeepSpeed's BF16 optimizer).

The effective rate counts what the FLOPs counter counts (``models.flops``: 2 FLOPs per multiply-add of
every convolution and the classifier, forward + backward = 3 × forward) for the sub-networks actually
drawn, over the second pass's wall time (CUDA synchronised before and after every step).  Every engine runs
the same sandwiches twice: the first pass meets their shapes, the second is timed.  On a GPU the first sight
of a shape is expensive (the one H200 run so far: ~5 s per channels-last fp32 step, ~10 s in bf16, against
~0.2 s once seen), and the kernels chosen stay for the whole process, so the "1st pass" column is the cold
cost only for the first engine of a layout and precision.  The plain fp32 loop is measured first and again
last; the two figures show the run's spread.  Exits with a message on a machine without a GPU unless
``--cpu`` (a smoke test of the script; the CPU engines are ``bench.step_throughput``'s).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from bench.common import argument_parser
from bench.engines import deepspeed, model_config, plain, random_batch, sandwich_step


def step_flops(space, subnets, batch: int, num_classes: int) -> float:
    """FLOPs of one sandwich step over ``batch`` images: forward + backward (3 × forward) of every sub-network
    at its own resolution, 2 FLOPs per multiply-add."""
    from models import subnet_cost

    return 3 * 2 * batch * sum(subnet_cost(space, s.arch, num_classes).macs for s in subnets)


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--space", default="alphanet")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64], help="images per step (one GPU)")
    parser.add_argument("--steps", type=int, default=8, help="sandwiches per engine, each run twice (median)")
    parser.add_argument("--only", nargs="*", default=None, help="engine names to run (default: all)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU anyway (a smoke test of this script)")
    args = parser.parse_args()
    if args.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif not torch.cuda.is_available():
        print("bench.gpu_step needs a CUDA GPU; on CPU run bench.step_throughput", file=sys.stderr)
        sys.exit(2)
    cuda = not args.cpu

    import torch.distributed as dist

    from models import ArchSampler, build_supernet
    from trainer.runtime.distributed import configure_threads, init_distributed, resolve
    from trainer.samplers import sample_sandwich
    from trainer.sections import EngineConfig

    env = resolve()
    if env.world_size != 1:
        sys.exit("bench.gpu_step runs as one process (world size 1)")
    device = init_distributed(env, EngineConfig().dist_timeout_s)
    assert device.type == ("cuda" if cuda else "cpu"), device

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    threads = configure_threads(None, 1)
    config = model_config(args.space)

    def plain_engine(net, batch):
        return plain(net, device)

    def deepspeed_engine(**trainer_options):
        def make(net, batch):
            return deepspeed(net, micro_batch=batch, world_size=1, **trainer_options)

        return make

    engines = [
        ("plain PyTorch", plain_engine, {}),
        ("plain PyTorch, NCHW", plain_engine, {"channels_last": False}),
        ("plain + bf16 autocast", plain_engine, {"bf16_autocast": True}),
        ("plain + bf16 autocast, NCHW", plain_engine, {"bf16_autocast": True, "channels_last": False}),
        *[(f"DeepSpeed ZeRO-{stage}", deepspeed_engine(zero_stage=stage), {}) for stage in (0, 1, 2, 3)],
        ("ZeRO-1 + bf16 autocast", deepspeed_engine(zero_stage=1), {"bf16_autocast": True}),
        ("ZeRO-1, bf16 weights", deepspeed_engine(zero_stage=1, bf16=True), {}),
        ("plain PyTorch (again)", plain_engine, {}),
    ]
    if args.only:
        engines = [e for e in engines if e[0] in args.only]

    def measure(make, batch: int, *, bf16_autocast: bool = False, channels_last: bool = True) -> dict:
        """Two passes over the same ``--steps`` sandwiches and batches: the first meets their shapes (on a GPU
        the kernels for a shape are chosen, and some compiled, the first time it is seen in the process), the
        second is the steady state.  Every engine draws the same sandwiches, so only the first engine of a
        layout and precision pays the first sight of a shape in full."""
        torch.manual_seed(0)
        net = build_supernet(config)
        net.channels_last = channels_last
        engine, module, _, reduction = make(net, batch)  # reduction(): around a step's backward passes
        sandwich = sandwich_step(bf16_autocast=bf16_autocast)
        sampler = ArchSampler(module.space, seed=0)
        gen = torch.Generator(device=device).manual_seed(0)
        res = max(module.space.resolutions)
        steps = [
            (sample_sandwich(module.space, sampler, 4), *random_batch(batch, res, config.num_classes, gen, device))
            for _ in range(args.steps)
        ]
        synchronize()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        passes = []
        for _ in range(2):
            times = []
            for subnets, images, labels in steps:
                synchronize()
                start = time.perf_counter()
                engine.train()
                with reduction():
                    sandwich(engine, module, subnets, images, labels)
                engine.step()
                synchronize()
                times.append(time.perf_counter() - start)
            passes.append(times)
        first, warm = passes
        flops = sum(step_flops(module.space, subnets, batch, config.num_classes) for subnets, _, _ in steps)
        result = {
            "first_ms": 1e3 * statistics.median(first),
            "ms": 1e3 * statistics.median(warm),
            "img_s": batch / statistics.median(warm),
            "tflops": flops / sum(warm) / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        }
        del engine, module, net
        if cuda:
            torch.cuda.empty_cache()
        return result

    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(
        f"{name}, torch {torch.__version__}, {threads} CPU threads; space {args.space}, 4 sub-networks per step, "
        f"median of {args.steps} steps, the second of two passes over them; TF32 convolutions "
        f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'}, TF32 matmul "
        f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'} (PyTorch's defaults)",
        flush=True,
    )
    for batch in args.batch:
        rows = []
        for label, make, options in engines:
            rows.append((label, measure(make, batch, **options)))
            r = rows[-1][1]
            print(f"  measured {label} at batch {batch}: {r['first_ms']:.1f} / {r['ms']:.1f} ms", flush=True)
        base = rows[0][1]["img_s"]
        print(f"\nbatch {batch} on one {'GPU' if cuda else 'CPU process'}:")
        print(
            f"{'engine':30s} {'1st pass ms':>11s} {'ms/step':>8s} {'img/s':>8s} {'x plain':>8s} {'TFLOP/s':>8s} "
            f"{'peak GiB':>9s}"
        )
        for label, r in rows:
            print(
                f"{label:30s} {r['first_ms']:11.1f} {r['ms']:8.1f} {r['img_s']:8.0f} {r['img_s'] / base:8.2f} "
                f"{r['tflops']:8.2f} {r['peak_gib']:9.2f}"
            )
        print(flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
