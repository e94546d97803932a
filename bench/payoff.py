"""Does the supernet pay, and from which budget?  Sub-networks of supernets trained with each KD method against the
same networks trained alone, at several budgets.

    .venv/bin/python -m bench.payoff [--data ROOT] [--budgets 6 12 24] [--seeds 2] [--single-seed-from 24]
                                    [--methods recipe none kl adaptive] [--jobs 2] [--out runs/payoff]
                                    [--set KEY=VALUE ...]

Data: ``--data`` (any prepared dataset), by default Fashion-MNIST at 1,000 training images per class and the full
test split, prepared once into ``data/fashion-mnist-1k`` from Debian's ``dataset-fashion-mnist`` (or the copy in
``../shared/datasets/fashion-mnist``).  For every budget (epochs) and seed: the recipe (``--config``) trains a
supernet per method (``recipe``: the recipe as it is; ``none``/``kl``/``adaptive``: that ``loss.kd_loss`` with
every KD lever off, AlphaNet's training; the ``+warmup``/``+mix``/``+gate`` variants: one lever each, see
``METHODS``), and the largest, the mid-size (``--mid`` of ``--models``) and the smallest sub-network are trained
alone on the labels with the same recipe and budget.  Each run is one process with the recipe's global batch
(``--batch-size``, default 64: the recipe's 2 ranks × 32), pinned to its own core, ``--jobs`` at a time.
Supernet sub-networks are evaluated after BatchNorm recalibration; stand-alone networks with their own statistics.
``--set`` adds overrides to every run (``data.hflip=true``: the recipe keeps the digits' ``false``).

Prints, per budget, mean ± std top-1 per method and sub-network with the gap to stand-alone and the number of
seeds, then the goals: at the longest budget the recipe within 1 point of stand-alone for the largest and the
smallest, and the recipe's KD at least as good as no KD at every budget.  Writes ``payoff.json`` and
``payoff.png`` (top-1 against budget) into ``--out``.  Every run is cached by its resolved config under
``OUT/runs``; an interrupted run resumes from its checkpoint, so the long budgets can span sessions.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue

from rich.console import Console
from rich.table import Table

from bench.ablation import evaluate, run_trainer
from bench.common import REPO, argument_parser, saved_figure
from data_pipeline.idx import FASHION_MNIST_DIR
from fileops import atomic_write_text
from models import load_named_archs
from trainer.config import RunConfig, load_config
from trainer.consolidate import consolidate
from typedconfig import ConfigError, dotted_items, to_mapping

LEVERS_OFF = ["loss.kd_warmup_epochs=0", "loss.kd_label_mix=0", "loss.kd_gate=none"]
METHODS: dict[str, list[str]] = {
    "recipe": [],
    "none": ["loss.kd_loss=none", *LEVERS_OFF],
    "kl": ["loss.kd_loss=kl", *LEVERS_OFF],
    "adaptive": ["loss.kd_loss=adaptive_alpha", *LEVERS_OFF],
    "adaptive+warmup": ["loss.kd_loss=adaptive_alpha", *LEVERS_OFF, "loss.kd_warmup_epochs=0.5R"],
    "adaptive+mix": ["loss.kd_loss=adaptive_alpha", *LEVERS_OFF, "loss.kd_label_mix=0.5"],
    "adaptive+gate": ["loss.kd_loss=adaptive_alpha", *LEVERS_OFF, "loss.kd_gate=teacher_correct"],
    "kl+warmup": ["loss.kd_loss=kl", *LEVERS_OFF, "loss.kd_warmup_epochs=0.5R"],
    "kl+mix": ["loss.kd_loss=kl", *LEVERS_OFF, "loss.kd_label_mix=0.5"],
    "kl+clean": ["loss.kd_loss=kl", *LEVERS_OFF, "task.teacher.clean_logits=true"],
    "adaptive+clean": ["loss.kd_loss=adaptive_alpha", *LEVERS_OFF, "task.teacher.clean_logits=true"],
}
"""Supernet methods: ``--set`` overrides of the recipe.  ``0.5R``: half the run's budget in epochs."""
ALONE = ("largest", "mid", "smallest")
GOAL_POINTS = 1.0
FASHION_MNIST_FOLDERS = (FASHION_MNIST_DIR, REPO.parent / "shared/datasets/fashion-mnist")


def default_data() -> Path:
    """Fashion-MNIST, 1,000 training images per class, prepared into ``data/fashion-mnist-1k`` once."""
    from data_pipeline import prepare

    folder = next((f for f in FASHION_MNIST_FOLDERS if f.is_dir()), FASHION_MNIST_FOLDERS[0])
    out = REPO / "data/fashion-mnist-1k"
    prepare.prepare(f"fashion-mnist:{folder}", out, ["webdataset"], quiet=True, train_per_class=1000)
    return out


def method_overrides(method: str, epochs: int) -> list[str]:
    return [o.replace("0.5R", str(epochs / 2)) for o in METHODS[method]]


DEFAULTS = dotted_items(to_mapping(RunConfig()))


def run_key(config: RunConfig) -> str:
    """A short hash of what the resolved config sets away from the defaults (its run folder aside): the same
    training, the same key, and a key that a config field added later with its default does not change."""
    chosen = {k: v for k, v in dotted_items(to_mapping(config)).items() if k != "run_dir" and DEFAULTS.get(k, ...) != v}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:10]


def cached_runs(folder: Path) -> dict[str, Path]:
    """``{run_key: run folder}`` of the runs under ``folder``, read from their recorded configs (whatever their
    folder's name: runs named by an earlier form of the key are found too); finished ones first."""
    found: dict[str, Path] = {}
    for recorded in sorted(folder.glob("*/config.yaml")):
        try:
            key = run_key(load_config(recorded))
        except ConfigError:
            continue
        done = finished(recorded.parent, "supernet") or finished(recorded.parent, "alone")
        if key not in found or done:
            found[key] = recorded.parent
    return found


class Plan:
    """The runs of the bench: ``(kind, method or network, epochs, seed) → (run folder, overrides)``."""

    def __init__(self, args, data: Path):
        self.args, self.runs = args, {}
        self.cached = cached_runs(args.out / "runs")
        common = [f"data.root={data}", f"data.batch_size={args.batch_size}", "eval.every_epochs=0"]
        common += ["log.tensorboard=false", *args.set]
        for epochs in args.budgets:
            seeds = 1 if args.single_seed_from and epochs >= args.single_seed_from else args.seeds
            for seed in range(seeds):
                budget = [*common, f"optimizer.epochs={epochs}", f"seed={seed}"]
                for method in args.methods:
                    self._add(("supernet", method, epochs, seed), [*budget, *method_overrides(method, epochs)])
                for net in ALONE:
                    arch = f"{args.models}:{args.mid}" if net == "mid" else net
                    alone = ["task.name=one_network", f"task.student.arch={arch}", "task.label_weight=1.0"]
                    self._add(("alone", net, epochs, seed), [*budget, *alone])

    def _add(self, what: tuple, overrides: list[str]) -> None:
        kind, _, epochs, seed = what
        # Named by the resolved config alone: two methods that train the same (the recipe and the method it
        # uses) share one run.
        key = run_key(load_config(self.args.config, overrides))
        run_dir = self.cached.get(key) or self.args.out / "runs" / f"{kind}_e{epochs}_s{seed}_{key}"
        self.runs[what] = (run_dir, [*overrides, f"run_dir={run_dir}"])


def finished(run_dir: Path, kind: str) -> bool:
    return (run_dir / ("supernet.safetensors" if kind == "supernet" else "final")).exists()


def train_all(plan: Plan, jobs: int, console: Console) -> None:
    """Every unfinished run, ``jobs`` at a time, each pinned to a core of this process's affinity."""
    todo = {run[0]: (what, run) for what, run in plan.runs.items() if not finished(run[0], what[0])}
    todo = list(todo.values())
    cores: Queue = Queue()
    for core in sorted(os.sched_getaffinity(0))[:jobs]:
        cores.put(core)
    distinct = len({run_dir for run_dir, _ in plan.runs.values()})
    console.print(f"{distinct - len(todo)} of {distinct} runs cached; training {len(todo)}")

    def one(item) -> None:
        (kind, name, epochs, seed), (run_dir, overrides) = item
        core = cores.get()
        try:
            console.print(f"[bold]{kind} {name}[/], {epochs} epochs, seed {seed} (core {core}): {run_dir}")
            run_trainer(plan.args.config, overrides, run_dir.parent / f"{run_dir.name}.log", cpu=core)
            if kind == "supernet":
                consolidate(run_dir)
        finally:
            cores.put(core)

    # The longest runs first: the pool's last minutes are not spent on one long run alone.
    todo.sort(key=lambda item: -item[0][2] * (4 if item[0][0] == "supernet" else 1))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, item) for item in todo]:
            future.result()


def alone_top1(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val/top1_student"] for r in records if "val/top1_student" in r][-1]


def collect(plan: Plan, archs: dict) -> list[dict]:
    results = []
    for (kind, name, epochs, seed), (run_dir, _) in plan.runs.items():
        supernet = kind == "supernet"
        top1 = evaluate(run_dir, archs, plan.args.calib_batches) if supernet else {name: alone_top1(run_dir)}
        results.append({"kind": kind, "name": name, "epochs": epochs, "seed": seed, "run": str(run_dir), "top1": top1})
    return results


def summarise(results: list[dict]) -> dict:
    """``{epochs: {row: {net: (mean, std, seeds)}}}``; row is a method or ``alone``."""
    cells: dict = {}
    for r in results:
        row = "alone" if r["kind"] == "alone" else r["name"]
        for net, value in r["top1"].items():
            cells.setdefault(r["epochs"], {}).setdefault(row, {}).setdefault(net, []).append(value)
    return {
        epochs: {
            row: {
                net: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                for net, v in per_net.items()
            }
            for row, per_net in rows.items()
        }
        for epochs, rows in sorted(cells.items())
    }


def print_tables(summary: dict, methods: list[str], data: Path, console: Console) -> None:
    for epochs, rows in summary.items():
        table = Table(title=f"{data.name}, {epochs} epochs: top-1 (%) mean ± std (seeds), gap to stand-alone")
        table.add_column("method")
        for net in ALONE:
            table.add_column(net, justify="right")
        for row in [*methods, "alone"]:
            cells = []
            for net in ALONE:
                mean, std, n = rows[row][net]
                gap = "" if row == "alone" else f"  ({mean - rows['alone'][net][0]:+.2f})"
                cells.append(f"{mean:.2f} ± {std:.2f} ({n}){gap}")
            table.add_row(row, *cells)
        console.print(table)


def goals(summary: dict, methods: list[str]) -> list[str]:
    """The bench's goals, each a line saying whether it is met and by how much."""
    lines = []
    longest = max(summary)
    if "recipe" in methods:
        rows = summary[longest]
        for net in ("largest", "smallest"):
            gap = rows["recipe"][net][0] - rows["alone"][net][0]
            verdict = "met" if gap >= -GOAL_POINTS else f"NOT met by {-gap - GOAL_POINTS:.2f} points"
            lines.append(f"{longest} epochs, {net}: recipe {gap:+.2f} vs alone (goal: within {GOAL_POINTS}): {verdict}")
    if "recipe" in methods and "none" in methods:
        for epochs, rows in summary.items():
            worse = {n: rows["recipe"][n][0] - rows["none"][n][0] for n in ALONE}
            short = {n: d for n, d in worse.items() if d < 0}
            detail = ", ".join(f"{n} {d:+.2f}" for n, d in worse.items())
            lines.append(f"{epochs} epochs, recipe's KD vs no KD: {detail}: " + ("met" if not short else "NOT met"))
    return lines


def plot(summary: dict, methods: list[str], path: Path) -> None:
    with saved_figure(path, (12, 4)) as (fig, _):
        fig.clf()
        axes = fig.subplots(1, len(ALONE), sharey=False)
        budgets = list(summary)
        for ax, net in zip(axes, ALONE, strict=True):
            for row in [*methods, "alone"]:
                points = [(b, summary[b][row][net]) for b in budgets if row in summary[b]]
                style = {"color": "black", "linestyle": "--"} if row == "alone" else {}
                ax.errorbar(
                    [b for b, _ in points],
                    [m for _, (m, _, _) in points],
                    yerr=[s for _, (_, s, _) in points],
                    marker="o",
                    capsize=3,
                    label=row,
                    **style,
                )
            ax.set_title(net)
            ax.set_xlabel("budget (epochs)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("top-1 (%)")
        axes[-1].legend(fontsize=8, loc="lower right")


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--config", type=Path, default=REPO / "configs/tiny_cpu.yaml")
    parser.add_argument("--data", type=Path, help="a prepared dataset (default: Fashion-MNIST, 1,000 per class)")
    parser.add_argument("--models", type=Path, default=REPO / "configs/tiny_models.yaml")
    parser.add_argument("--mid", default="tiny_m", help="the mid-size network: a name in --models")
    parser.add_argument("--budgets", type=int, nargs="+", default=[6, 12, 24], help="epochs")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--single-seed-from", type=int, help="budgets of at least this many epochs run seed 0 only")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["recipe", "none", "kl", "adaptive"])
    parser.add_argument("--batch-size", type=int, default=64, help="per run (one process): the recipe's global batch")
    parser.add_argument("--jobs", type=int, default=min(2, len(os.sched_getaffinity(0))), help="runs at once")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "runs/payoff")
    parser.add_argument("--set", nargs="+", action="extend", default=[], help="more overrides of every run")
    parser.add_argument("--train-only", action="store_true", help="train what is missing, print nothing")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    console = Console()
    data = (args.data or default_data()).resolve()
    space, named = load_named_archs(args.models)
    if args.mid not in named:
        parser.error(f"--mid {args.mid}: not in {args.models} ({', '.join(named)})")
    plan = Plan(args, data)  # resolves every config: a bad override fails here, before any training
    train_all(plan, args.jobs, console)
    if args.train_only:
        return
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    archs = {"largest": space.largest(), "mid": named[args.mid], "smallest": space.smallest()}
    results = collect(plan, archs)
    summary = summarise(results)
    print_tables(summary, args.methods, data, console)
    lines = goals(summary, args.methods)
    for line in lines:
        console.print(line)
    record = {
        "data": str(data),
        "config": str(args.config),
        "methods": {m: METHODS[m] for m in args.methods},
        "runs": results,
        "summary": {str(e): rows for e, rows in summary.items()},
        "goals": lines,
    }
    atomic_write_text(args.out / "payoff.json", json.dumps(record, indent=2))
    plot(summary, args.methods, args.out / "payoff.png")
    console.print(f"runs: {args.out / 'payoff.json'}\nplot: {args.out / 'payoff.png'}")


if __name__ == "__main__":
    main()
