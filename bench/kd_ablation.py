"""Does KD help, and does adaptive KD help more?  The same recipe trained with each KD loss over several seeds.

    .venv/bin/python bench/kd_ablation.py [--data ROOT] [--seeds 3] [--epochs 12] [--out runs/kd_ablation]

For every (loss, seed) it trains ``configs/tiny_cpu.yaml`` (or ``--config``) in its own process with
``loss.kd_loss`` in {none, kl, adaptive_alpha (reference choice), adaptive_alpha (exact choice)}, then
evaluates, after BatchNorm recalibration, the smallest, the fixed mid-size models of ``--models`` and
the largest sub-network.  It prints a table of mean ± std top-1 per sub-network and loss, and writes
``kd_ablation.json`` (every run) and ``kd_ablation.png`` (top-1 against MFLOPs per loss, error bars)
into ``--out``.  Finished runs are reused when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from data_pipeline import build_loader  # noqa: E402
from data_pipeline import prepare as prep  # noqa: E402
from fileops import atomic_output, atomic_write_text  # noqa: E402
from models import build_supernet, load_named_archs  # noqa: E402
from models.flops import subnet_cost  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.consolidate import consolidate  # noqa: E402
from trainer.evaluate import collect_calibration, evaluate_arch  # noqa: E402

LOSSES = {
    "none": ["loss.kd_loss=none"],
    "kl": ["loss.kd_loss=kl"],
    "adaptive (reference choice)": ["loss.kd_loss=adaptive_alpha", "loss.adaptive_choice=reference"],
    "adaptive (exact choice)": ["loss.kd_loss=adaptive_alpha", "loss.adaptive_choice=exact"],
}


def train(config: Path, run_dir: Path, data: Path, seed: int, epochs: int, loss_overrides: list[str]) -> None:
    """One training run in its own process (DeepSpeed initialises one process group per process)."""
    if (run_dir / "supernet.safetensors").is_file():
        return
    overrides = [f"run_dir={run_dir}", f"data.root={data}", f"seed={seed}", f"trainer.epochs={epochs}"]
    overrides += ["trainer.eval_every_epochs=0", "trainer.tensorboard=false", *loss_overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = env.get("DS_ACCELERATOR", "cpu")
    with socket.socket() as s:  # a single process still rendezvous with itself: on a free port
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    command = [sys.executable, str(REPO / "trainer/run.py"), "--config", str(config), "--set", *overrides]
    log = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode != 0:
            raise SystemExit(f"training failed, see {log}")
    consolidate(run_dir)


def evaluate(run_dir: Path, archs: dict, calib_batches: int) -> dict[str, float]:
    """Top-1 of each named arch after BN recalibration on ``calib_batches`` training batches."""
    config = load_config(run_dir / "config.yaml")
    supernet = build_supernet(config.model)
    supernet.load_state_dict(load_file(str(run_dir / "supernet.safetensors")))
    data = replace(config.data, num_workers=0)
    calib_loader = build_loader(data, data.train_split, train=True, seed=config.seed + 1)
    calib = collect_calibration(calib_loader, calib_batches, "cpu", data.mean, data.std)
    val = list(build_loader(data, data.val_split, train=False))
    scores = {}
    for name, arch in archs.items():
        result = evaluate_arch(
            supernet, arch, calib, val, mean=data.mean, std=data.std, device="cpu", across_ranks=False
        )
        scores[name] = result["top1"]
    return scores


def plot(summary: dict, mflops: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    names = sorted(mflops, key=mflops.get)
    for loss, per_net in summary.items():
        means = [per_net[n][0] for n in names]
        stds = [per_net[n][1] for n in names]
        ax.errorbar([mflops[n] for n in names], means, yerr=stds, marker="o", capsize=3, label=loss)
    ax.set_xlabel("MFLOPs (multiply-adds)")
    ax.set_ylabel("top-1 (%) after BN recalibration")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/tiny_cpu.yaml")
    parser.add_argument("--data", type=Path, help="a prepared dataset (default: the bundled digits in data/digits)")
    parser.add_argument("--models", type=Path, default=REPO / "configs/tiny_models.yaml", help="fixed mid-size models")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "runs/kd_ablation")
    args = parser.parse_args()
    data = args.data or REPO / "data/digits"
    if args.data is None:
        prep.prepare("digits", data, ["webdataset", "ffcv"], quiet=True)
    space, named = load_named_archs(args.models)
    archs = {"smallest": space.smallest()}
    archs.update({name: arch for name, arch in named.items() if arch not in (space.smallest(), space.largest())})
    archs["largest"] = space.largest()
    num_classes = load_config(args.config).model.num_classes
    mflops = {name: subnet_cost(space, arch, num_classes).mflops for name, arch in archs.items()}
    console = Console()
    runs = []
    for seed in range(args.seeds):
        for loss, overrides in LOSSES.items():
            run_dir = args.out / f"{loss.split()[0]}{'_exact' if 'exact' in loss else ''}_seed{seed}"
            console.print(f"[bold]{loss}[/], seed {seed}: {run_dir}")
            train(args.config, run_dir, data, seed, args.epochs, overrides)
            runs.append(
                {
                    "loss": loss,
                    "seed": seed,
                    "run_dir": str(run_dir),
                    "top1": evaluate(run_dir, archs, args.calib_batches),
                }
            )
    summary = {
        loss: {
            name: (
                statistics.mean(r["top1"][name] for r in runs if r["loss"] == loss),
                statistics.stdev(r["top1"][name] for r in runs if r["loss"] == loss) if args.seeds > 1 else 0.0,
            )
            for name in archs
        }
        for loss in LOSSES
    }
    table = Table(title=f"top-1 (%) on {data.name} val, mean ± std over {args.seeds} seed(s), {args.epochs} epochs")
    table.add_column("loss")
    for name in archs:
        table.add_column(f"{name} ({mflops[name]:.2f} MFLOPs)", justify="right")
    for loss, per_net in summary.items():
        table.add_row(loss, *(f"{m:.2f} ± {s:.2f}" for m, s in (per_net[n] for n in archs)))
    console.print(table)
    atomic_write_text(
        args.out / "kd_ablation.json", json.dumps({"mflops": mflops, "runs": runs, "summary": summary}, indent=2)
    )
    plot(summary, mflops, args.out / "kd_ablation.png")
    console.print(f"runs: {args.out / 'kd_ablation.json'}\nplot: {args.out / 'kd_ablation.png'}")


if __name__ == "__main__":
    main()
