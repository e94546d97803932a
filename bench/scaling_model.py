"""A paper model of the ImageNet recipe's step time on 16–64 GPUs, per ZeRO stage (not a measurement).

    .venv/bin/python -m bench.scaling_model [--space alphanet] [--batch 32] [--tflops 2.8] [--zero3-overhead 3.2]
                                            [--nvlink-gbs 300] [--ib-gbs 100] [--gpus-per-node 8] [--grad-bytes 4]

Compute per image comes from our exact FLOPs counter: one sandwich step runs the largest sub-network, the
smallest and ``num_subnets - 2`` random ones (their mean FLOPs over 2,000 draws), forward + backward ≈ 3 ×
forward, 2 FLOPs per multiply-add.  ``--tflops`` is the *effective* rate a GPU sustains on these small
depthwise-heavy networks: its default, 2.8, is what ``bench.gpu_step`` measured for the DeepSpeed ZeRO-0
engine on one H200 in fp32 at 32 images (one run, 2026-11-30; far below the chip's peak: the step is bound
by its thousands of small kernels and the Python that launches them).  ``--zero3-overhead`` is ZeRO-3's step
time over ZeRO-0's on one GPU, where no byte crosses a link (the same run: 3.2, its per-module gather and
release hooks); it multiplies ZeRO-3's compute.  Measure yours with ``bench.gpu_step`` or the trainer's
``time/step_ms`` and set both.  Communication per step, with ``P`` the supernet's parameters and ``b`` bytes per
gradient element:

- ZeRO-0 / 1 / 2: one reduction of the accumulated gradients per optimizer step (an all-reduce, or a
  reduce-scatter + an all-gather of the updated partition: the same volume);
- ZeRO-3: a reduce-scatter of the gradients plus an all-gather of the parameters in every forward and every
  backward of each sub-network (2 · num_subnets all-gathers).

Reductions are hierarchical: inside a node over NVLink (``--nvlink-gbs`` per GPU), across nodes over each
node's InfiniBand link (``--ib-gbs`` per node).  Nothing overlaps in this
model (an upper bound on step time); DeepSpeed overlaps part of the reduction with the last backward.
"""

from __future__ import annotations

import statistics

from bench.common import argument_parser
from models import ArchSampler, ModelConfig, build_supernet, load_search_space, subnet_cost


def ring_seconds(bytes_: float, gpus: int, gpus_per_node: int, nvlink_gbs: float, ib_gbs: float) -> float:
    """Time of one hierarchical all-reduce of ``bytes_``: reduce-scatter + all-gather inside each node over
    NVLink (2 (g − 1)/g · bytes per GPU) and an all-reduce of the node's shards across nodes, the whole
    gradient crossing each node's InfiniBand link 2 (nodes − 1)/nodes times.  An all-gather or a
    reduce-scatter alone moves half of this."""
    nodes = max(1, gpus // gpus_per_node)
    intra = 2 * (gpus_per_node - 1) / gpus_per_node * bytes_ / (nvlink_gbs * 1e9)
    inter = 2 * (nodes - 1) / nodes * bytes_ / (ib_gbs * 1e9)
    return intra + inter


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--space", default="alphanet")
    parser.add_argument("--batch", type=int, default=32, help="images per GPU per step (the recipe: 32)")
    parser.add_argument("--num-subnets", type=int, default=4)
    parser.add_argument(
        "--tflops", type=float, default=2.8, help="effective TFLOP/s per GPU (bench.gpu_step, ZeRO-0, one H200)"
    )
    parser.add_argument(
        "--zero3-overhead", type=float, default=3.2, help="ZeRO-3 step time / ZeRO-0 step time on one GPU"
    )
    parser.add_argument("--nvlink-gbs", type=float, default=300.0, help="NVLink bandwidth per GPU, GB/s")
    parser.add_argument("--ib-gbs", type=float, default=100.0, help="InfiniBand bandwidth per node, GB/s")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--grad-bytes", type=int, default=4, help="bytes per reduced gradient (4: fp32)")
    args = parser.parse_args()

    space = load_search_space(args.space)
    sampler = ArchSampler(space, 0)
    random_macs = statistics.mean(subnet_cost(space, sampler.random()).macs for _ in range(2000))
    macs = subnet_cost(space, space.largest()).macs + subnet_cost(space, space.smallest()).macs
    macs += (args.num_subnets - 2) * random_macs
    flops_per_image = 3 * 2 * macs
    params = sum(p.numel() for p in build_supernet(ModelConfig(search_space=args.space)).parameters())
    compute_s = args.batch * flops_per_image / (args.tflops * 1e12)

    print(
        f"{args.space}: {flops_per_image / 1e9:.1f} GFLOP per image per step (fwd+bwd of {args.num_subnets} "
        f"sub-networks), supernet {params / 1e6:.1f} M parameters ({params * args.grad_bytes / 1e6:.0f} MB of "
        f"gradients); {args.batch} images/GPU at {args.tflops:g} effective TFLOP/s = {1e3 * compute_s:.0f} ms compute "
        f"(ZeRO-3: x{args.zero3_overhead:g})"
    )
    print(
        f"links: NVLink {args.nvlink_gbs:g} GB/s per GPU, InfiniBand {args.ib_gbs:g} GB/s per node, "
        f"{args.gpus_per_node} GPUs per node; no overlap assumed"
    )
    header = f"{'GPUs':>5} {'stage':>7} {'comm ms':>8} {'step ms':>8} {'img/s':>9} {'efficiency':>10}"
    print(header)
    for gpus in (16, 32, 64):
        allreduce = ring_seconds(params * args.grad_bytes, gpus, args.gpus_per_node, args.nvlink_gbs, args.ib_gbs)
        # ZeRO-3: reduce-scatter of the gradients + an all-gather of the parameters in every forward and
        # every backward of each sub-network (each half an all-reduce).
        zero3_comm = allreduce / 2 * (1 + 2 * args.num_subnets)
        for stage, comm, compute in (
            ("0/1/2", allreduce, compute_s),
            ("3", zero3_comm, compute_s * args.zero3_overhead),
        ):
            step = compute + comm
            print(
                f"{gpus:5d} {stage:>7} {1e3 * comm:8.1f} {1e3 * step:8.0f} {gpus * args.batch / step:9.0f} "
                f"{compute_s / step:10.0%}"
            )


if __name__ == "__main__":
    main()
