"""Search entry point: ``python search/run.py --config configs/search_X.yaml --run RUN_DIR [--export ...]``
(also ``python -m search``; ``--run-dir`` under torchrun).

Loads the supernet of a training run (consolidating its newest checkpoint to safetensors if needed),
runs the evolutionary search of AlphaNet §4.2, appends every evaluated candidate to
``RUN/search/candidates.jsonl`` (a rerun continues from it), writes the Pareto front as JSON and PNG,
and exports chosen sub-networks (``--export a1 pareto@300``) as safetensors + YAML + ONNX.
Any world size works: each rank scores its share of the new candidates alone (no collective inside
an evaluation), and results are exchanged once per generation, whatever the shares' sizes.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts search/ first on sys.path: put the repository root there instead, so that
# module names in search/ cannot shadow packages and `search` itself imports.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE)]

import argparse  # noqa: E402
import faulthandler  # noqa: E402
import functools  # noqa: E402
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from trainer.runtime.accelerator import default_to_cpu  # noqa: E402

default_to_cpu()  # before DeepSpeed is imported (below): its probe warns on every rank of a machine without one

from data_pipeline import DataConfig, build_loader  # noqa: E402
from data_pipeline.device_transforms import rescale  # noqa: E402
from models import ArchSampler, load_named_archs  # noqa: E402
from models.families import Arch, Space, family_of, load_search_space  # noqa: E402
from models.flops import subnet_cost  # noqa: E402
from search.candidates import CandidateStore  # noqa: E402
from search.config import SearchConfig, SearchFile  # noqa: E402
from search.evolution import (  # noqa: E402
    ENUMERATE_LIMIT,
    Candidate,
    FlopsConstrainedSampler,
    SpaceExhausted,
    every_arch,
    pareto_front,
    select_parents,
)
from search.export import ExportError, check_spec, choose, export_subnet  # noqa: E402
from search.pareto import write_front  # noqa: E402
from search.progress import SearchConsole  # noqa: E402
from search.widths import width_archs, width_table, write_widths  # noqa: E402
from trainer.config import RunConfig, load_config  # noqa: E402
from trainer.consolidate import load_supernet  # noqa: E402
from trainer.paths import config_anchor  # noqa: E402
from trainer.runtime.distributed import configure_threads, init_distributed, local_device, local_world_size, resolve  # noqa: E402
from trainer.runtime.evaluate import calibrated_subnet, collect_calibration, evaluate_arch  # noqa: E402
from trainer.state.safe_checkpoint import CheckpointFileError  # noqa: E402
from typedconfig import (  # noqa: E402
    ConfigError,
    add_set_argument,
    apply_overrides,
    from_mapping,
    load_yaml,
    parse_override,
    to_mapping,
)
from typedconfig.paths import anchor_paths  # noqa: E402


class CandidateEvaluator:
    """One architecture → a scored :class:`Candidate`, after BN recalibration, on this rank alone.

    Calibration and validation batches are loaded once; the calibration batches are rescaled once per
    resolution (memory grows with the number of resolutions, never with the number of candidates).
    """

    def __init__(self, supernet: torch.nn.Module, calib: list[torch.Tensor], val: list, data: DataConfig, device):
        self.supernet, self.calib, self.val, self.data, self.device = supernet, calib, val, data, device
        self._calib_at: dict[int, list[torch.Tensor]] = {}

    def calibration(self, resolution: int, batches: int) -> list[torch.Tensor]:
        """The first ``batches`` calibration batches at ``resolution``."""
        if resolution not in self._calib_at:
            self._calib_at[resolution] = [rescale(x, resolution) for x in self.calib]
        return self._calib_at[resolution][:batches]

    def calibrated(self, arch: Arch, batches: int) -> torch.nn.Module:
        return calibrated_subnet(self.supernet, arch, self.calibration(arch.resolution, batches), across_ranks=False)

    def __call__(self, arch: Arch, batches: int) -> Candidate:
        scores = evaluate_arch(
            self.supernet,
            arch,
            self.calibration(arch.resolution, batches),
            self.val,
            mean=self.data.mean,
            std=self.data.std,
            device=self.device,
            across_ranks=False,
        )
        cost = subnet_cost(self.supernet.space, arch, self.supernet.config.num_classes)
        return Candidate(arch, round(cost.mflops, 4), round(cost.params_m, 5), scores["top1"], scores["top5"])


# ---------------------------------------------------------------------------------------------- phases
def load_batches(search: SearchConfig, data: DataConfig, device) -> tuple[list[torch.Tensor], list]:
    """(normalised calibration batches, validation batches), the same on every rank, so that a candidate's
    score does not depend on which rank (or how many ranks) evaluated it."""
    calib_loader = build_loader(data, data.train_split, train=True, seed=search.seed + 1)
    count = max(search.calib_batches, search.marked_calib_batches or 0)
    calib = collect_calibration(calib_loader, count, device, data.mean, data.std)
    val = []
    for batch in build_loader(data, data.val_split, train=False):
        val.append(batch)
        if search.val_batches and len(val) >= search.val_batches:
            break
    return calib, val


def evolve(
    search: SearchConfig, space: Space, num_classes: int, store: CandidateStore, evaluate, out: SearchConsole
) -> list[Candidate]:
    """Generation 0 plus ``search.iterations`` generations of crossover and mutation children."""
    evaluate = functools.partial(evaluate, batches=search.calib_batches)
    sampler = ArchSampler(space, search.seed)
    constrained = FlopsConstrainedSampler(space, sampler, search.min_mflops, search.max_mflops, num_classes)
    seen: set[str] = set()
    # The most architectures the search would draw.  A space small enough to list (a slimmable space's widths)
    # is listed: when its range holds no more than that, all of it is evaluated (drawing that many distinct
    # ones could not succeed); otherwise its draws fall back on the list (see FlopsConstrainedSampler.pool).
    wanted = search.population + search.iterations * (search.crossovers + search.mutations)
    every = every_arch(space, max(wanted, ENUMERATE_LIMIT))
    if every is not None:
        inside = [arch for arch in every if constrained.ok(arch)]
        if not inside:
            raise SpaceExhausted(
                f"no sub-network of '{space.name}' within [{search.min_mflops}, {search.max_mflops}] MFLOPs; "
                "widen the range (search.min_mflops, search.max_mflops)"
            )
        if len(inside) <= wanted:
            out.say(
                f"'{space.name}' holds {len(every)} sub-networks, {len(inside)} within the FLOPs range: "
                "evaluating all of them"
            )
            return store.score(inside, evaluate, out.progress("every sub-network"))
        constrained.pool = inside
    first = [constrained.draw(sampler.random, seen) for _ in range(search.population)]
    population = store.score(first, evaluate, out.progress("generation 0"))
    out.say(f"generation 0: {len(population)} candidates, best top-1 {max(c.top1 for c in population):.2f}%")
    for generation in range(1, search.iterations + 1):
        parents = select_parents(population, search.parents, search.bucket_mflops)

        def pick(parents=parents) -> Arch:
            return parents[sampler.index(len(parents))].arch

        children = [constrained.draw(lambda: sampler.crossover(pick(), pick()), seen) for _ in range(search.crossovers)]
        children += [
            constrained.draw(lambda: sampler.mutate(pick(), search.mutation_prob), seen)
            for _ in range(search.mutations)
        ]
        population += store.score(children, evaluate, out.progress(f"generation {generation}"))
        out.say(
            f"generation {generation}: {len(population)} candidates, best top-1 {max(c.top1 for c in population):.2f}%"
        )
    return population


def marked_archs(mark_models: Path | None, space: Space) -> dict[str, Arch]:
    """The models of the table ``mark_models`` that lie inside ``space`` ({} without a table, or for a table of
    another family: e.g. AlphaNet models against a slimmable supernet)."""
    if not mark_models:
        return {}
    table_space, named = load_named_archs(mark_models)
    if family_of(table_space) is not family_of(space):
        return {}
    return {name: arch for name, arch in named.items() if not arch.problems(space)}


def score_marked(
    search: SearchConfig, space: Space, store: CandidateStore, evaluate, out: SearchConsole
) -> dict[str, Candidate]:
    """The models of ``search.mark_models`` that lie inside ``space``, scored like candidates."""
    inside = marked_archs(search.mark_models, space)
    if not inside:
        return {}
    batches = search.marked_calib_batches or search.calib_batches
    scored = store.score(list(inside.values()), functools.partial(evaluate, batches=batches), out.progress("marked"))
    return dict(zip(inside, scored))


def score_widths(
    search: SearchConfig, space: Space, store: CandidateStore, evaluate, out: SearchConsole
) -> dict[str, Candidate]:
    """A slimmable space's every width (``0.35x`` …), scored like marked models; {} for other spaces."""
    archs = width_archs(space)
    batches = search.marked_calib_batches or search.calib_batches
    scored = store.score(list(archs.values()), functools.partial(evaluate, batches=batches), out.progress("widths"))
    return dict(zip(archs, scored))


def report(search: SearchConfig, population: list[Candidate], marked: dict[str, Candidate], out: Path, console) -> None:
    """front.json, front.png and the front as a table."""
    json_path, png_path = write_front(population, out, search.bucket_mflops, marked)
    title = f"Pareto front of {len(population)} candidates ({search.min_mflops:g}–{search.max_mflops:g} MFLOPs)"
    table = Table(title=title)
    for col in ("MFLOPs", "params (M)", "res", "top-1", "top-5"):
        table.add_column(col, justify="right")
    for c in pareto_front(population):
        table.add_row(f"{c.mflops:.2f}", f"{c.params_m:.3f}", str(c.arch.resolution), f"{c.top1:.2f}", f"{c.top5:.2f}")
    console.print(table)
    console.print(f"front: {json_path}\nplot:  {png_path}")


def export(
    search: SearchConfig,
    specs: list[str],
    population: list[Candidate],
    marked: dict[str, Candidate],
    evaluate: CandidateEvaluator,
    out: Path,
    console,
    data: DataConfig,
) -> None:
    """Each ``--export`` spec: the chosen candidate recalibrated as it was scored, saved (with ``data``'s
    preprocessing) and checked."""
    for spec in specs:
        name, chosen = choose(spec, population, marked)
        batches = (search.marked_calib_batches or search.calib_batches) if spec in marked else search.calib_batches
        model = evaluate.calibrated(chosen.arch, batches)
        folder, torch_diff, onnx_diff = export_subnet(
            model, chosen, out / "exports" / name, data.preprocessing(chosen.arch.resolution)
        )
        console.print(
            f"exported {name} ({chosen.mflops:.2f} MFLOPs, top-1 {chosen.top1:.2f}%) to {folder}: "
            f"reload max diff {torch_diff:.2e}, ONNX max diff {onnx_diff:.2e}"
        )


def score_identity(search: SearchConfig, run_dir: Path, data: DataConfig) -> dict:
    """What a candidate's score depends on: the weights (their checkpoint tag), calibration and validation
    settings, the data and its split."""
    from trainer.consolidate import WEIGHTS_NAME, weights_tag

    return {
        "weights": weights_tag(run_dir / WEIGHTS_NAME),
        "calib_batches": search.calib_batches,
        "marked_calib_batches": search.marked_calib_batches,
        "val_batches": search.val_batches,
        "batch_size": data.batch_size,
        "data": str(Path(data.root).resolve()),
        "val_split": data.val_split,
        "eval_resize": data.eval_resize,
        "base_resolution": data.base_resolution,
    }


def run_search(
    search: SearchConfig, run_config: RunConfig, run_dir: Path, exports: list[str], local_rank_arg=None
) -> int:
    """load → calibrate → evolve → report → export."""
    env = resolve(local_rank_arg=local_rank_arg)
    owns_group = env.world_size > 1 and not dist.is_initialized()  # a caller's group is the caller's to end
    device = init_distributed(env, search.dist_timeout_s) if owns_group else local_device(env)
    threads = configure_threads(None, local_world_size())
    console = Console(width=None if Console().is_terminal else 160)
    lines = SearchConsole(console, is_main=env.is_main, world_size=env.world_size)
    lines.say(f"search of {run_dir}: {env.world_size} rank(s), {threads} thread(s) per rank")
    out = run_dir / search.output
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    try:
        lines.say("loading the supernet's weights")
        supernet = load_supernet(run_dir, run_config.model, env.rank, device)
        data = replace(run_config.data, batch_size=search.batch_size or run_config.data.batch_size)
        calib, val = load_batches(search, data, device)
        lines.say(f"{len(calib)} calibration and {len(val)} validation batches of {data.root} loaded")
        evaluate = CandidateEvaluator(supernet, calib, val, data, device)
        store = CandidateStore(out, env.rank, env.world_size, score_identity(search, run_dir, data))
        if store.note:
            lines.say(store.note)
        if len(store):
            lines.say(f"continuing from {store.path}: {len(store)} candidates already evaluated")
        population = evolve(search, supernet.space, run_config.model.num_classes, store, evaluate, lines)
        marked = score_marked(search, supernet.space, store, evaluate, lines)
        widths = score_widths(search, supernet.space, store, evaluate, lines)
        marked.update(widths)
        if env.is_main:
            report(search, population, marked, out, console)
            if widths:
                console.print(width_table(widths))
                console.print("widths: {}\nplot:   {}".format(*write_widths(widths, out)))
            export(search, exports, population, marked, evaluate, out, console, run_config.data)
        if owns_group:  # only on success: a rank that failed must exit now, not wait in a barrier
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        console.file.flush()
        raise
    return 0


def anchor_search_paths(search: SearchConfig, config_file: Path, overrides: list[str]) -> None:
    """The search config's relative paths by the run config's rule (:mod:`trainer.paths`: beside the config, then
    the repository; ``--set`` values from the shell's folder); a missing model table is a config error now."""
    given = [".".join(parse_override(text)[0]) for text in overrides]
    anchor_paths(search, config_anchor(config_file, given), prefix="search.")
    if search.mark_models is not None and not search.mark_models.is_file():
        raise ConfigError(
            f"{search.mark_models} not found (a relative path is looked up beside the config, then in the repository)",
            key="search.mark_models",
            source=config_file,
        )


def check_exports(specs: list[str], space: Space, mark_models: Path | None) -> None:
    """Every ``--export`` spec names something exportable, before anything is loaded: ``pareto@MFLOPS`` or a
    marked model of ``mark_models`` inside ``space`` (or a width of a slimmable space)."""
    names = [*width_archs(space), *marked_archs(mark_models, space)]
    for spec in specs:
        try:
            check_spec(spec)
        except ValueError:
            raise ConfigError(
                f"--export {spec}: the budget must be a number of MFLOPs (pareto@300: the best top-1 of the Pareto "
                "front within 300 MFLOPs)"
            ) from None
        if not spec.startswith("pareto@") and spec not in names:
            known = ", ".join(names) if names else "none: set search.mark_models to a model table"
            raise ConfigError(f"--export {spec}: not a marked model of this search ({known}) nor pareto@MFLOPS")


def main(argv: list[str] | None = None) -> int:
    # A fatal signal in native code (e.g. SIGBUS: a memory-mapped .beton cut while the run reads it) prints
    # every thread's Python stack instead of dying silently.
    faulthandler.enable(all_threads=True)
    parser = argparse.ArgumentParser(
        prog="search/run.py",
        description="Evolutionary search of a trained supernet.",
        epilog="Every key of the search config, with its type, default and meaning: docs/config.md.",
    )
    parser.add_argument("--config", required=True, help="search YAML (a `search:` section)")
    # --run-dir is the spelling to use under torchrun, whose own parser takes --run for an abbreviation of --run-path.
    parser.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        type=Path,
        help="training run folder (config.yaml, checkpoints)",
    )
    add_set_argument(parser, example="--set search.iterations=5")
    parser.add_argument("--export", nargs="*", default=[], metavar="NAME|pareto@MFLOPS", help="sub-networks to export")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved search config (defaults filled in) and exit"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        source = f"{args.config} (with --set overrides)" if args.overrides else args.config
        search = from_mapping(SearchFile, apply_overrides(load_yaml(args.config), args.overrides), source=source).search
        anchor_search_paths(search, Path(args.config), args.overrides)
        if args.print_config:
            print(yaml.safe_dump({"search": to_mapping(search)}, sort_keys=False), end="")
            return 0
        if not (args.run / "config.yaml").is_file():
            raise ConfigError("no config.yaml: not a training run folder", source=args.run)
        run_config = load_config(args.run / "config.yaml")
        if run_config.task.name != "sandwich":
            raise ConfigError(
                f"trained one network, not a supernet: there is nothing to search; its model is {args.run / 'final'}",
                source=args.run,
            )
        check_exports(args.export, load_search_space(run_config.model.search_space), search.mark_models)
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        return run_search(search, run_config, args.run, args.export, args.local_rank)
    except (ExportError, CheckpointFileError, SpaceExhausted) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
