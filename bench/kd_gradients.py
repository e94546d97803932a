"""What the distilled sub-networks' gradients do to the shared weights: their norm and their cosine with the largest
sub-network's label gradient, per student loss, at initialisation and in trained supernet runs.

    .venv/bin/python -m bench.kd_gradients RUN [RUN ...] [--batches 6]

For each run (a supernet run folder: its config, data and newest weights) and for a fresh supernet of the first
run's config, on ``--batches`` training batches: the largest sub-network's label-smoothed CE gradient (dropout on,
as the sandwich rule takes it), then for the smallest and one random sub-network the gradient of each student
loss (``ce``: the labels; ``kl``; ``adaptive``: AlphaNet's adaptive alpha-divergence) against the largest's
detached logits.  Prints the mean norm of each gradient over all the supernet's weights, the mean cosine of each
student gradient with the largest's, the share of samples where adaptive KD takes its α− branch and the largest's
top-1 on the batches.  A student gradient with a cosine near 0 adds no label signal to the shared weights; its
norm is what it adds instead.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench.common import argument_parser
from data_pipeline import build_loader
from data_pipeline.device_transforms import normalize, rescale
from losses import LossConfig, build_kd_loss, build_label_loss
from models import build_supernet
from models.sampler import ArchSampler
from trainer.config import load_config
from trainer.consolidate import load_supernet

STUDENT_LOSSES = ("ce", "kl", "adaptive")


def flat_gradient(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def measure(net, config, batches: list, seed: int) -> dict[str, float]:
    """Mean norms, cosines, α− share and the largest's top-1 over ``batches``."""
    space, data = net.space, config.data
    label_loss = build_label_loss(LossConfig(label_smoothing=config.loss.label_smoothing))
    kd = {
        name: build_kd_loss(LossConfig(kd_loss=loss)) for name, loss in (("kl", "kl"), ("adaptive", "adaptive_alpha"))
    }
    params = [p for p in net.parameters() if p.requires_grad]
    sampler = ArchSampler(space, seed)
    values: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        values.setdefault(key, []).append(value)

    net.train()
    for batch in batches:
        images = normalize(batch.images, data.mean, data.std)
        net.set_arch(space.largest(), regularize=True)
        logits = net(rescale(images, space.largest().resolution))
        teacher_grad = flat_gradient(label_loss(logits, batch.labels), params)
        add("largest: label gradient norm", teacher_grad.norm().item())
        add("largest: top-1 on the batches", 100 * (logits.argmax(1) == batch.labels).float().mean().item())
        teacher = logits.detach()
        for arch in (space.smallest(), sampler.random()):
            for name in STUDENT_LOSSES:
                net.set_arch(arch, regularize=False)
                student = net(rescale(images, arch.resolution))
                loss = label_loss(student, batch.labels) if name == "ce" else kd[name](student, teacher)
                if name == "adaptive":
                    add("adaptive: α− share", kd[name].picks_minus(student, teacher).float().mean().item())
                grad = flat_gradient(loss, params)
                add(f"student {name}: gradient norm", grad.norm().item())
                add(f"student {name}: cosine with the largest's", torch.cosine_similarity(grad, teacher_grad, 0).item())
    return {key: statistics.mean(v) for key, v in values.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("runs", type=Path, nargs="+", help="supernet run folders")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    columns: dict[str, dict[str, float]] = {}
    for i, run in enumerate(args.runs):
        config = load_config(run / "config.yaml")
        data = replace(config.data, num_workers=0)
        loader = build_loader(data, data.train_split, train=True, seed=args.seed)
        batches = [b for _, b in zip(range(args.batches), loader)]
        if i == 0:
            torch.manual_seed(args.seed)
            columns["fresh supernet"] = measure(build_supernet(config.model), config, batches, args.seed)
        columns[run.name] = measure(load_supernet(run, config.model, rank=0, device="cpu"), config, batches, args.seed)
    table = Table(title=f"gradients on the shared weights, mean over {args.batches} training batches × 2 students")
    table.add_column("")
    for name in columns:
        table.add_column(name, justify="right")
    for key in next(iter(columns.values())):
        table.add_row(key, *(f"{c[key]:.3f}" for c in columns.values()))
    Console().print(table)


if __name__ == "__main__":
    main()
