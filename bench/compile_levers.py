"""``torch.compile`` (inductor) as a lever for the sandwich step on a CPU, against PyTorch's eager kernels.

    .venv/bin/python -m bench.compile_levers [--space alphanet] [--batch 4] [--subnets smallest largest] [--reps 3]

One process, one thread, the trainer's host allocator (``trainer.runtime.host_allocator``), channels-last, fp32,
training mode; every time is forward + backward, the best of ``--reps``, eager and compiled taking turns.

1. **BatchNorm + SiLU fused.**  Every BatchNorm of a sub-network that a SiLU follows (the expansion and
   depthwise layers of its blocks) is one eager ``batch_norm`` and one eager ``silu``, each a pass over the
   activation forward and backward.  Inductor fuses them into one kernel per shape.  For the distinct input
   shapes of these layers in the largest sub-network, eager against ``torch.compile(dynamic=False)`` of the
   same two calls; their compile time is printed apart.
2. **Whole sub-networks compiled.**  The largest and the smallest sub-network are the same every step (the
   sandwich rule), so their shapes repeat and a compiled forward + backward would be reused (the random ones
   change every step, and would recompile every time).  For each named sub-network: its first compiled pass
   (the compile), then eager against compiled.

Ratios above 1 mean the compiled code is faster.  Verified on CPU only (a GPU's inductor emits Triton).
"""

from __future__ import annotations

import time
from functools import partial

import torch
import torch.nn.functional as F

from bench.common import argument_parser
from bench.engines import model_config


def bn_silu(x, running_mean, running_var, weight, bias):
    """The supernet's BatchNorm (training mode, momentum 0.1) and the SiLU after it, in two eager calls."""
    return F.silu(F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5))


def bn_silu_pass(fn, x, stats, weight, bias, grad) -> None:
    fn(x, *stats, weight, bias).backward(grad)


def subnet_pass(model, x) -> None:
    model.train()(x).logsumexp(1).mean().backward()


def bn_silu_shapes(net, batch: int) -> list[tuple[int, ...]]:
    """The distinct input shapes of the largest sub-network's BatchNorms that a SiLU follows, from one forward."""
    from models.ops import DynamicBatchNorm2d

    shapes: list[tuple[int, ...]] = []

    def record(module, inputs, output):
        shape = tuple(inputs[0].shape)
        if shape not in shapes:
            shapes.append(shape)

    hooks = [
        m.register_forward_hook(record)
        for name, m in net.named_modules()
        if isinstance(m, DynamicBatchNorm2d) and name.endswith(("expand_bn", "dw_bn"))
    ]
    net.set_arch(net.space.largest())
    res = net.space.largest().resolution
    with torch.no_grad():
        net.train()(torch.randn(batch, 3, res, res).contiguous(memory_format=torch.channels_last))
    for hook in hooks:
        hook.remove()
    return shapes


def best_of_turns(reps: int, **fns) -> dict[str, float]:
    """Each function run ``reps`` times, taking turns; the best wall time of each, in seconds."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def fused_bn_silu(shapes, reps: int) -> None:
    compiled = torch.compile(bn_silu, dynamic=False)
    print("1. BatchNorm + SiLU, forward + backward: eager against one inductor kernel per shape")
    print(f"{'input (N, C, H, W)':24s} {'eager ms':>9s} {'compiled ms':>12s} {'compile s':>10s} {'x eager':>8s}")
    totals = {"eager": 0.0, "compiled": 0.0}
    for shape in shapes:
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
        weight, bias = torch.rand(shape[1]).requires_grad_(), torch.randn(shape[1]).requires_grad_()
        stats = (torch.zeros(shape[1]), torch.ones(shape[1]))
        grad = torch.randn_like(x)

        eager_pass = partial(bn_silu_pass, bn_silu, x, stats, weight, bias, grad)
        compiled_pass = partial(bn_silu_pass, compiled, x, stats, weight, bias, grad)
        start = time.perf_counter()
        compiled_pass()
        compile_s = time.perf_counter() - start
        best = best_of_turns(reps, eager=eager_pass, compiled=compiled_pass)
        for key in totals:
            totals[key] += best[key]
        print(
            f"{shape!s:24s} {1e3 * best['eager']:9.2f} {1e3 * best['compiled']:12.2f} {compile_s:10.1f} "
            f"{best['eager'] / best['compiled']:8.2f}"
        )
    print(
        f"{'all shapes':24s} {1e3 * totals['eager']:9.2f} {1e3 * totals['compiled']:12.2f} {'':10s} "
        f"{totals['eager'] / totals['compiled']:8.2f}"
    )


def compiled_subnets(net, names: list[str], batch: int, reps: int) -> None:
    import torch._dynamo

    # Every block is its own frame to dynamo (a block runs per candidate and depth); allow their recompiles.
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 65536
    print("\n2. whole sub-networks, forward + backward: eager against torch.compile(dynamic=False)")
    print(
        f"{'sub-network':12s} {'resolution':>10s} {'eager ms':>9s} {'compiled ms':>12s} {'compile s':>10s} "
        f"{'x eager':>8s}"
    )
    for name in names:
        arch = getattr(net.space, name)()
        net.set_arch(arch)
        x = torch.randn(batch, 3, arch.resolution, arch.resolution).contiguous(memory_format=torch.channels_last)
        compiled = torch.compile(net, dynamic=False)

        eager_pass, compiled_pass = partial(subnet_pass, net, x), partial(subnet_pass, compiled, x)
        eager_pass()  # warm-up
        start = time.perf_counter()
        compiled_pass()
        compile_s = time.perf_counter() - start
        best = best_of_turns(reps, eager=eager_pass, compiled=compiled_pass)
        print(
            f"{name:12s} {arch.resolution:10d} {1e3 * best['eager']:9.1f} {1e3 * best['compiled']:12.1f} "
            f"{compile_s:10.1f} {best['eager'] / best['compiled']:8.2f}"
        )
        torch._dynamo.reset()


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--space", default="alphanet")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--subnets", nargs="*", choices=("smallest", "largest"), default=["smallest", "largest"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-shapes", type=int, default=8, help="BatchNorm + SiLU shapes measured (the first)")
    args = parser.parse_args()

    from models import build_supernet
    from trainer.runtime.host_allocator import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = build_supernet(model_config(args.space))
    print(f"space {args.space}, batch {args.batch}, 1 thread, channels-last fp32, best of {args.reps} turns\n")
    fused_bn_silu(bn_silu_shapes(net, args.batch)[: args.max_shapes], args.reps)
    compiled_subnets(net, args.subnets, args.batch, args.reps)


if __name__ == "__main__":
    main()
