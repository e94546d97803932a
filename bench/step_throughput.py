"""Sandwich-step throughput through DeepSpeed (ZeRO 0–3) vs a plain-PyTorch loop of the same math, and
per-rank optimizer-state memory, with 2 processes on CPU (gloo).

    .venv/bin/python bench/step_throughput.py [--steps 6] [--batch 16] [--space tiny]

The plain loop runs the same N sub-network forward/backward passes, all-reduces all gradients once
as one flat tensor (averaging over ranks), clips by value and takes one Nesterov SGD step.  Ratios are samples/s of each
engine against that baseline, measured in the same processes, after one warm-up step.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the SGD momentum buffers this rank holds (ZeRO 1–3 keep only their partition's)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(
        v.numel() * v.element_size() for state in inner.state.values() for v in state.values() if torch.is_tensor(v)
    )


def worker(args) -> None:
    import torch.distributed as dist

    from losses import LossConfig, build_kd_loss, build_label_loss
    from models import ArchSampler, ModelConfig, build_supernet
    from trainer.distributed import init_distributed, resolve
    from trainer.engine import build_engine, build_optimizer
    from trainer.sandwich import SandwichStep, sample_sandwich
    from trainer.trainer_config import TrainerConfig

    env = resolve()
    init_distributed(env, TrainerConfig().dist_timeout_s)
    torch.set_num_threads(1)
    model_config = ModelConfig(search_space=args.space, num_classes=10 if args.space == "tiny" else 1000)
    losses = SandwichStep(build_label_loss(LossConfig()), build_kd_loss(LossConfig()))
    gen = torch.Generator().manual_seed(env.rank)

    def make_batch(net):
        res = max(net.space.resolutions)
        return torch.randn(args.batch, 3, res, res, generator=gen), torch.randint(
            0, model_config.num_classes, (args.batch,), generator=gen
        )

    class PlainEngine:
        """Engine interface over a plain module: one all-reduce per gradient at the last backward."""

        def __init__(self, net, optimizer):
            self.net, self.optimizer, self.boundary = net, optimizer, False

        def __call__(self, x):
            return self.net(x)

        def set_gradient_accumulation_boundary(self, boundary):
            self.boundary = boundary

        def backward(self, loss):
            loss.backward()
            if self.boundary:  # one flat all-reduce of every gradient, like DDP's buckets in one go
                from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

                params = list(self.net.parameters())
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                grads = [p.grad for p in params]
                flat = _flatten_dense_tensors(grads)
                dist.all_reduce(flat)
                flat /= dist.get_world_size()
                for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                    g.copy_(synced)

        def step(self):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        def train(self):
            self.net.train()

    def timed(engine, module) -> dict[str, float]:
        """Median samples/s over the timed steps, and the median milliseconds of forward + backward of the N
        sub-networks (for DeepSpeed ZeRO 0-1 and the plain loop this includes the gradient all-reduce at the
        last backward) and of the optimizer step (ZeRO 2-3: also their gradient reduction)."""
        sampler = ArchSampler(module.space, seed=0)
        rates, passes, steps = [], [], []
        for step in range(args.steps + 1):
            images, labels = make_batch(module)
            dist.barrier()
            start = time.perf_counter()
            engine.train()
            losses(engine, module, sample_sandwich(module.space, sampler, 4), images, labels)
            middle = time.perf_counter()
            engine.step()
            dist.barrier()
            end = time.perf_counter()
            if step:  # the first step is a warm-up
                rates.append(args.batch * dist.get_world_size() / (end - start))
                passes.append(1e3 * (middle - start))
                steps.append(1e3 * (end - middle))
        median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        return {"rate": median(rates), "passes_ms": median(passes), "step_ms": median(steps)}

    def plain() -> tuple[dict[str, float], int]:
        torch.manual_seed(0)
        net = build_supernet(model_config)
        opt = build_optimizer(net, TrainerConfig(), lr=0.01)
        return timed(PlainEngine(net, opt), net), optimizer_state_bytes(opt)

    # The baseline runs first and again last: its mean is the reference, so neither warm-up effects nor
    # drift of the machine during the run favour one side.
    results = {"plain PyTorch (first)": plain()}
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        net = build_supernet(model_config)
        built = build_engine(
            net, TrainerConfig(zero_stage=stage), micro_batch=args.batch, world_size=env.world_size, lr=0.01
        )
        results[f"DeepSpeed ZeRO-{stage}"] = (
            timed(built.engine, built.module),
            optimizer_state_bytes(built.engine.optimizer),
        )
    results["plain PyTorch (last)"] = plain()
    if env.rank == 0:
        firsts = (results["plain PyTorch (first)"][0]["rate"], results["plain PyTorch (last)"][0]["rate"])
        base_rate, base_mem = sum(firsts) / 2, results["plain PyTorch (first)"][1]
        print(
            f"space {args.space}, 2 ranks x {args.batch} images, 4 sub-networks per step, median of {args.steps} "
            f"steps; baseline: mean of the plain loop measured first and last ({firsts[0]:.2f}, {firsts[1]:.2f})"
        )
        print(
            f"{'engine':22s} {'samples/s':>9s} {'ratio':>6s} {'fwd+bwd ms':>10s} {'step ms':>8s} {'momentum MiB':>12s}"
        )
        for name, (timing, mem) in results.items():
            print(
                f"{name:22s} {timing['rate']:9.2f} {timing['rate'] / base_rate:6.2f} {timing['passes_ms']:10.0f} "
                f"{timing['step_ms']:8.0f} {mem / 2**20:12.3f} (x{mem / max(base_mem, 1):.2f})"
            )
    dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(Path(__file__).resolve()),
        "--worker",
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--space",
        args.space,
    ]
    sys.exit(subprocess.run(command, env=env).returncode)


if __name__ == "__main__":
    main()
