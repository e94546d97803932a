"""Does the supernet rank sub-networks the way training them alone would?  The yardstick of a weight-sharing
strategy.

    .venv/bin/python -m bench.ranking [--run RUN] [--n 16] [--epochs 12] [--out runs/ranking] [--data ROOT]
                                     [--sharing global local random]

For ``--n`` sub-networks spread evenly over the space's FLOPs range (quantiles of many seeded random draws):
the accuracy each inherits from the supernet (after BatchNorm recalibration), and its accuracy when trained
alone from scratch with the same recipe and budget (``--config``, ``--epochs``; a ``standalone:`` run each,
in its own process).  Prints Kendall τ, Spearman ρ and the top-k overlap between the two rankings, and
writes ``ranking.json`` and ``ranking.png`` (stand-alone against inherited top-1) into ``--out``.  Without
``--run`` the supernet is trained first (the same recipe and epochs) into ``OUT/supernet``.  Stand-alone
runs are cached by architecture and budget in ``OUT/standalone``, so reruns and other supernets reuse them.

``--sharing`` compares weight-sharing strategies (Distribution Consistent NAS, Table 3): each named one trains
its own supernet (``OUT/supernet`` for global sharing, ``OUT/supernet_local``, ``OUT/supernet_random``; local
sharing with 1 warm-up epoch, half an epoch per layer, a meta-network step every 5 steps) and is ranked
against the same stand-alone runs; a last table puts τ, ρ, the top-k overlap and the inherited top-1 of the
smallest and the largest sub-network side by side.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table
from scipy import stats

from bench.ablation import evaluate, run_trainer, train
from bench.common import REPO, argument_parser, prepared_data, saved_figure
from fileops import atomic_write_text
from models import ArchSampler, load_search_space
from models.flops import subnet_cost
from trainer.config import load_config
from trainer.consolidate import consolidate


def spread_archs(space, num_classes: int, n: int, seed: int, pool: int = 2000) -> list:
    """``n`` distinct sub-networks at evenly spaced FLOPs quantiles of ``pool`` seeded random draws."""
    sampler = ArchSampler(space, seed)
    drawn = {}
    for arch in [space.smallest(), space.largest(), *(sampler.random() for _ in range(pool))]:
        drawn[json.dumps(arch.to_dict(), sort_keys=True)] = arch
    ordered = sorted(drawn.values(), key=lambda a: subnet_cost(space, a, num_classes).macs)
    picks = sorted({round(q) for q in np.linspace(0, len(ordered) - 1, n)})
    return [ordered[i] for i in picks]


def train_alone(config: Path, table: Path, name: str, arch_key: str, data: Path, epochs: int, out: Path) -> float:
    """Top-1 of ``name`` trained alone (labels only) with the recipe's settings; cached by arch and budget."""
    budget = hashlib.sha256(f"{arch_key}|{config.read_text()}|{epochs}|{data}".encode()).hexdigest()[:12]
    run_dir = out / f"{budget}"
    metrics = run_dir / "metrics.jsonl"
    if not (run_dir / "final").is_dir():
        overrides = [f"run_dir={run_dir}", f"data.root={data}", f"optimizer.epochs={epochs}"]
        overrides += ["eval.every_epochs=0", "log.tensorboard=false"]
        overrides += ["task.name=one_network", f"task.student.arch={table}:{name}", "task.label_weight=1.0"]
        run_trainer(config, overrides, out / f"{budget}.log")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r["val/top1_student"] for r in records if "val/top1_student" in r][-1]


def top_k_overlap(a: list[float], b: list[float], k: int) -> float:
    """Share of the top-``k`` of ``a`` that is also in the top-``k`` of ``b``."""
    top_a = set(np.argsort(a)[::-1][:k].tolist())
    top_b = set(np.argsort(b)[::-1][:k].tolist())
    return len(top_a & top_b) / k


def plot(inherited: list[float], alone: list[float], mflops: list[float], title: str, path: Path) -> None:
    with saved_figure(path, (5.5, 4.5)) as (fig, ax):
        points = ax.scatter(inherited, alone, c=mflops, cmap="viridis")
        fig.colorbar(points, label="MFLOPs")
        ax.set_xlabel("inherited top-1 (%), after BN recalibration")
        ax.set_ylabel("stand-alone top-1 (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)


LOCAL = ["model.sharing.name=local", "model.sharing.warmup_epochs=1", "model.sharing.epochs_per_layer=0.5"]
LOCAL += ["model.sharing.meta_every=5"]
SHARING = {"global": [], "local": LOCAL, "random": [*LOCAL, "model.sharing.assignment=random"]}


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--config", type=Path, default=REPO / "configs/tiny_cpu.yaml")
    parser.add_argument("--run", type=Path, help="a trained supernet run (default: train one into OUT/supernet)")
    parser.add_argument("--data", type=Path, help="a prepared dataset (default: the bundled digits in data/digits)")
    parser.add_argument("--n", type=int, default=16, help="sub-networks to rank")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of the supernet and of each stand-alone run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "runs/ranking")
    parser.add_argument("--sharing", nargs="+", choices=sorted(SHARING), default=["global"], help="strategies to rank")
    args = parser.parse_args()
    if args.run is not None and len(args.sharing) > 1:
        parser.error("--run ranks one given supernet; --sharing trains one per strategy")
    data = prepared_data(args.data)
    load_config(args.config)  # a bad recipe fails here, before any training
    summary = {}
    for sharing in args.sharing:
        run = args.run
        if run is None:
            run = args.out / ("supernet" if sharing == "global" else f"supernet_{sharing}")
            train(args.config, run, data, args.seed, args.epochs, SHARING[sharing])
        elif not (run / "supernet.safetensors").is_file():
            consolidate(run)
        summary[sharing] = rank(args, run, data, "" if sharing == "global" else f"_{sharing}")
    if len(summary) > 1:
        table = Table(
            title=f"weight sharing: ranking of {args.n} sub-networks and inherited top-1, {args.epochs} epochs"
        )
        for column in ("sharing", "Kendall tau", "Spearman rho", "top-k overlap", "smallest top-1", "largest top-1"):
            table.add_column(column, justify="right")
        for sharing, r in summary.items():
            cells = (r["kendall_tau"], r["spearman_rho"], r["top_k_overlap"])
            table.add_row(sharing, *(f"{v:.3f}" for v in cells), f"{r['smallest']:.2f}", f"{r['largest']:.2f}")
        Console().print(table)


def rank(args, run: Path, data: Path, suffix: str) -> dict:
    """Rank ``run``'s sub-networks against the stand-alone runs; write ``ranking{suffix}.json/png``."""
    run_config = load_config(run / "config.yaml")
    space = load_search_space(run_config.model.search_space)
    num_classes = run_config.model.num_classes
    archs = spread_archs(space, num_classes, args.n, args.seed)
    names = [f"r{i:02d}" for i in range(len(archs))]
    table_path = args.out / "archs.yaml"
    table = {"search_space": run_config.model.search_space, "models": {n: a.to_dict() for n, a in zip(names, archs)}}
    atomic_write_text(table_path, yaml.safe_dump(table, sort_keys=False))

    console = Console()
    inherited_scores = evaluate(run, dict(zip(names, archs)), args.calib_batches)
    inherited, alone, mflops = [], [], []
    for name, arch in zip(names, archs):
        key = json.dumps(arch.to_dict(), sort_keys=True)
        console.print(f"{name}: stand-alone training ({subnet_cost(space, arch, num_classes).mflops:.3f} MFLOPs)")
        alone.append(train_alone(args.config, table_path, name, key, data, args.epochs, args.out / "standalone"))
        inherited.append(inherited_scores[name])
        mflops.append(subnet_cost(space, arch, num_classes).mflops)
    tau = stats.kendalltau(inherited, alone).statistic
    rho = stats.spearmanr(inherited, alone).statistic
    k = max(1, len(archs) // 4)
    overlap = top_k_overlap(inherited, alone, k)

    result = Table(title=f"ranking of {len(archs)} sub-networks: {run} vs stand-alone, {args.epochs} epochs")
    for column in ("name", "MFLOPs", "inherited top-1", "stand-alone top-1"):
        result.add_column(column, justify="right")
    for name, m, i, a in zip(names, mflops, inherited, alone):
        result.add_row(name, f"{m:.3f}", f"{i:.2f}", f"{a:.2f}")
    console.print(result)
    console.print(f"Kendall tau {tau:.3f}, Spearman rho {rho:.3f}, top-{k} overlap {overlap:.2f}")
    record = {
        "run": str(run),
        "top_k_overlap": overlap,
        "sharing": run_config.model.sharing.name,
        "epochs": args.epochs,
        "kendall_tau": tau,
        "spearman_rho": rho,
        f"top{k}_overlap": overlap,
        "archs": [
            {"name": n, "arch": a.to_dict(), "mflops": m, "inherited_top1": i, "standalone_top1": s}
            for n, a, m, i, s in zip(names, archs, mflops, inherited, alone)
        ],
    }
    atomic_write_text(args.out / f"ranking{suffix}.json", json.dumps(record, indent=2))
    title = f"Kendall τ {tau:.2f}, Spearman ρ {rho:.2f}, top-{k} overlap {overlap:.2f}"
    plot(inherited, alone, mflops, title, args.out / f"ranking{suffix}.png")
    console.print(f"json: {args.out / f'ranking{suffix}.json'}\nplot: {args.out / f'ranking{suffix}.png'}")
    return {**record, "smallest": inherited[0], "largest": inherited[-1]}


if __name__ == "__main__":
    main()
