"""Trainer runs in their own processes and the top-1 of their sub-networks (shared by ``bench.ranking`` and the
ablation benches), and the ablation benches' harness (``bench.kd_ablation``, ``bench.strategies``): train the
tiny recipe once per (variant, seed), evaluate named sub-networks after BN recalibration, tabulate mean ± std
top-1 and the mean step time per variant, write a JSON of every run and a plot.  Finished runs are reused
when a bench is run again."""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import REPO, prepared_data, python_env, saved_figure
from data_pipeline import build_loader
from fileops import atomic_write_text
from models import load_named_archs
from models.flops import subnet_cost
from trainer.config import load_config
from trainer.consolidate import consolidate, load_supernet
from trainer.runtime.evaluate import collect_calibration, evaluate_arch


def train(config: Path, run_dir: Path, data: Path, seed: int, epochs: int, loss_overrides: list[str]) -> None:
    """One training run in its own process (DeepSpeed initialises one process group per process)."""
    if (run_dir / "supernet.safetensors").is_file():
        return
    overrides = [f"run_dir={run_dir}", f"data.root={data}", f"seed={seed}", f"optimizer.epochs={epochs}"]
    overrides += ["eval.every_epochs=0", "log.tensorboard=false", *loss_overrides]
    run_trainer(config, overrides, run_dir.parent / f"{run_dir.name}.log")
    consolidate(run_dir)


def run_trainer(config: Path, overrides: list[str], log: Path, cpu: int | None = None) -> None:
    """``trainer/run.py --config CONFIG --set OVERRIDES`` as one process on a free port, output in ``log``;
    ``cpu``: pinned to that core, one thread."""
    env = {k: v for k, v in python_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = env.get("DS_ACCELERATOR", "cpu")
    if cpu is not None:
        env["OMP_NUM_THREADS"] = "1"
    with socket.socket() as s:  # a single process still rendezvous with itself: on a free port
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    command = [sys.executable, str(REPO / "trainer/run.py"), "--config", str(config), "--set", *overrides]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        if cpu is not None:  # before the child's imports start threads (no preexec_fn: the benches use threads)
            os.sched_setaffinity(process.pid, {cpu})
        if process.wait() != 0:
            raise SystemExit(f"training failed, see {log}")


def evaluate(run_dir: Path, archs: dict, calib_batches: int) -> dict[str, float]:
    """Top-1 of each named arch after BN recalibration on ``calib_batches`` training batches, kept in
    ``RUN/bench_top1.json`` for the same weights, archs and calibration (a rerun reads it back)."""
    weights = run_dir / "supernet.safetensors"
    key = json.dumps(
        {
            "archs": {n: a.to_dict() for n, a in archs.items()},
            "calib_batches": calib_batches,
            "weights": [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.is_file() else None,
        },
        sort_keys=True,
    )
    cache = run_dir / "bench_top1.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["top1"]
    scores = _evaluate(run_dir, archs, calib_batches)
    atomic_write_text(cache, json.dumps({"key": key, "top1": scores}))
    return scores


def _evaluate(run_dir: Path, archs: dict, calib_batches: int) -> dict[str, float]:
    config = load_config(run_dir / "config.yaml")
    supernet = load_supernet(run_dir, config.model, rank=0, device="cpu")
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
    with saved_figure(path, (7, 4.5)) as (_, ax):
        names = sorted(mflops, key=mflops.get)
        for loss, per_net in summary.items():
            means = [per_net[n][0] for n in names]
            stds = [per_net[n][1] for n in names]
            ax.errorbar([mflops[n] for n in names], means, yerr=stds, marker="o", capsize=3, label=loss)
        ax.set_xlabel("MFLOPs (multiply-adds)")
        ax.set_ylabel("top-1 (%) after BN recalibration")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)


def step_ms(run_dir: Path) -> float:
    """Median over the run's logged windows of the wall time of one optimizer step (data wait excluded); the
    first window is left out (it holds one-time costs: DeepSpeed's kernel build, allocator warm-up)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["time/step_ms"] for r in records if "time/step_ms" in r]
    return statistics.median(times[1:] or times) if times else float("nan")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def add_arguments(parser) -> None:
    parser.add_argument("--config", type=Path, default=REPO / "configs/tiny_cpu.yaml")
    parser.add_argument("--data", type=Path, help="a prepared dataset (default: the bundled digits in data/digits)")
    parser.add_argument("--models", type=Path, default=REPO / "configs/tiny_models.yaml", help="fixed mid-size models")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--calib-batches", type=int, default=8)


def run_ablation(args, variants: dict[str, list[str]], *, title: str, name: str, run_name=slug) -> None:
    """Train every (variant, seed), print the table, write ``{name}.json`` and ``{name}.png`` into ``args.out``."""
    data = prepared_data(args.data)
    space, named = load_named_archs(args.models)
    archs = {"smallest": space.smallest()}
    archs.update({n: arch for n, arch in named.items() if arch not in (space.smallest(), space.largest())})
    archs["largest"] = space.largest()
    num_classes = load_config(args.config).model.num_classes
    mflops = {n: subnet_cost(space, arch, num_classes).mflops for n, arch in archs.items()}
    console = Console()
    runs = []
    for seed in range(args.seeds):
        for variant, overrides in variants.items():
            run_dir = args.out / f"{run_name(variant)}_seed{seed}"
            console.print(f"[bold]{variant}[/], seed {seed}: {run_dir}")
            train(args.config, run_dir, data, seed, args.epochs, overrides)
            top1 = evaluate(run_dir, archs, args.calib_batches)
            runs.append(
                {"variant": variant, "seed": seed, "run_dir": str(run_dir), "top1": top1, "step_ms": step_ms(run_dir)}
            )

    def over_seeds(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    summary = {
        variant: {n: over_seeds([r["top1"][n] for r in runs if r["variant"] == variant]) for n in archs}
        for variant in variants
    }
    steps = {variant: statistics.mean(r["step_ms"] for r in runs if r["variant"] == variant) for variant in variants}
    baseline = steps[next(iter(variants))]
    table = Table(
        title=f"{title}: top-1 (%) on {data.name} val, mean ± std over {args.seeds} seed(s), {args.epochs} epochs"
    )
    table.add_column(title)
    for n in archs:
        table.add_column(f"{n} ({mflops[n]:.2f} MFLOPs)", justify="right")
    table.add_column("step ms (× first row)", justify="right")
    for variant, per_net in summary.items():
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in (per_net[n] for n in archs)]
        table.add_row(variant, *cells, f"{steps[variant]:.0f} ({steps[variant] / baseline:.2f}×)")
    console.print(table)
    record = {"mflops": mflops, "runs": runs, "summary": summary, "step_ms": steps}
    atomic_write_text(args.out / f"{name}.json", json.dumps(record, indent=2))
    plot(summary, mflops, args.out / f"{name}.png")
    console.print(f"runs: {args.out / (name + '.json')}\nplot: {args.out / (name + '.png')}")
