"""Search entry point: ``python trainer/search.py --config configs/search_X.yaml --run RUN_DIR [--export ...]``
(``--run-dir`` under torchrun).

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

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.search_config import SearchConfig, SearchFile  # noqa: E402
from typedconfig import ConfigError, apply_overrides, from_mapping, load_yaml  # noqa: E402

CANDIDATES = "candidates.jsonl"
PARTIAL = "candidates.rank{rank}.partial.jsonl"


class CandidateEvaluator:
    """Top-1/top-5 of one architecture after BN recalibration, on this rank alone.

    Calibration and validation batches are loaded once; their rescaled versions are cached per
    resolution (memory grows with the number of resolutions, never with the number of candidates).
    """

    def __init__(self, supernet, calib: list[torch.Tensor], val: list, data_config, device):
        self.supernet, self.calib, self.val = supernet, calib, val
        self.mean, self.std, self.device = data_config.mean, data_config.std, device
        self._calib_at: dict[int, list[torch.Tensor]] = {}

    def calibration(self, resolution: int) -> list[torch.Tensor]:
        from data_pipeline.rescale import rescale

        if resolution not in self._calib_at:
            self._calib_at[resolution] = [rescale(x, resolution) for x in self.calib]
        return self._calib_at[resolution]

    def calibrated(self, arch):
        from models.static import extract_subnet
        from trainer.evaluate import recalibrate_bn

        static = extract_subnet(self.supernet, arch)
        recalibrate_bn(static, self.calibration(arch.resolution), across_ranks=False)
        return static

    def __call__(self, arch) -> tuple[float, float]:
        from trainer.evaluate import accuracy_counts

        static = self.calibrated(arch)
        c1, c5, n = accuracy_counts(
            static, self.val, arch.resolution, self.mean, self.std, self.device, across_ranks=False
        ).tolist()
        return 100.0 * c1 / max(n, 1), 100.0 * c5 / max(n, 1)


def ensure_weights(run_dir: Path, rank: int) -> Path:
    """RUN/supernet.safetensors, consolidated by rank 0 when missing or older than the newest checkpoint."""
    from trainer.checkpoint import latest_tag
    from trainer.consolidate import WEIGHTS_NAME, consolidate

    weights = run_dir / WEIGHTS_NAME
    tag = latest_tag(run_dir / "checkpoints")
    stale = tag is not None and (
        not weights.exists() or weights.stat().st_mtime < (run_dir / "checkpoints" / tag).stat().st_mtime
    )
    if rank == 0 and (stale or not weights.exists()):
        if tag is None:
            raise FileNotFoundError(f"{run_dir} has neither {WEIGHTS_NAME} nor a committed checkpoint")
        consolidate(run_dir)
    if dist.is_initialized():
        dist.barrier()
    return weights


def read_candidates(out: Path) -> dict[str, dict]:
    """Scores already computed: ``candidates.jsonl`` plus the per-rank partial files of an
    interrupted generation (lines cut by a kill are skipped; those candidates are evaluated again)."""
    from trainer.evolution import Candidate, arch_key

    cache = {}
    for path in [out / CANDIDATES, *sorted(out.glob(PARTIAL.format(rank="*")))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                cache[arch_key(Candidate.from_record(record).arch)] = record
    return cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer/search.py", description="Evolutionary search of a trained supernet.")
    parser.add_argument("--config", required=True, help="search YAML (a `search:` section)")
    # --run-dir is the spelling to use under torchrun, whose own parser takes --run for an abbreviation of --run-path.
    parser.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        type=Path,
        help="training run folder (holds config.yaml and checkpoints)",
    )
    parser.add_argument(
        "--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE", help="e.g. search.iterations=5"
    )
    parser.add_argument("--export", nargs="*", default=[], metavar="NAME|pareto@MFLOPS", help="sub-networks to export")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        source = f"{args.config} (with --set overrides)" if args.overrides else args.config
        search = from_mapping(SearchFile, apply_overrides(load_yaml(args.config), args.overrides), source=source).search
        if not (args.run / "config.yaml").is_file():
            raise ConfigError("no config.yaml: not a training run folder", source=args.run)
        run_config = load_config(args.run / "config.yaml")
        for spec in args.export:
            if spec.startswith("pareto@"):
                float(spec.split("@", 1)[1])
    except (ConfigError, ValueError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return run_search(search, run_config, args.run, args.export, args.local_rank)


def run_search(search: SearchConfig, run_config, run_dir: Path, exports: list[str], local_rank_arg=None) -> int:
    from rich.console import Console
    from rich.table import Table
    from safetensors.torch import load_file

    from data_pipeline import build_loader, normalize
    from models import ArchSampler, build_supernet, load_named_archs
    from models.flops import subnet_cost
    from trainer.distributed import resolve
    from trainer.evolution import Candidate, FlopsConstrainedSampler, arch_key, select_parents
    from trainer.pareto import write_front

    env = resolve(local_rank_arg=local_rank_arg)
    if env.world_size > 1:
        env.export()
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    console = Console(width=None if Console().is_terminal else 160)
    say = console.print if env.is_main else (lambda *a, **k: None)
    out = run_dir / search.output
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)

    weights = ensure_weights(run_dir, env.rank)
    supernet = build_supernet(run_config.model)
    supernet.load_state_dict(load_file(str(weights)))
    supernet.to(device).eval()
    space, num_classes = supernet.space, run_config.model.num_classes

    data = run_config.data
    if search.batch_size:
        from dataclasses import replace

        data = replace(data, batch_size=search.batch_size)
    # Every rank calibrates on the same batches, so a candidate's score does not depend on which rank
    # (or how many ranks) evaluated it.
    calib_loader = build_loader(data, data.train_split, train=True, seed=search.seed + 1)
    calib = []
    for batch in calib_loader:
        calib.append(normalize(batch.to(device).images, data.mean, data.std))
        if len(calib) >= search.calib_batches:
            break
    val = []
    for batch in build_loader(data, data.val_split, train=False):
        val.append(batch)
        if search.val_batches and len(val) >= search.val_batches:
            break
    evaluate = CandidateEvaluator(supernet, calib, val, data, device)

    path, partial = out / CANDIDATES, out / PARTIAL.format(rank=env.rank)
    cache = read_candidates(out)
    if cache:
        say(f"continuing from {path}: {len(cache)} candidates already evaluated")
    if dist.is_initialized():
        dist.barrier()  # every rank has read the partial files before any rewrites them
    if env.is_main and cache:  # one clean file: merged partials, no line cut by a kill
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in cache.values()))
        os.replace(tmp, path)
        for stale in out.glob(PARTIAL.format(rank="*")):
            stale.unlink()
    if dist.is_initialized():
        dist.barrier()

    def score(archs) -> list[Candidate]:
        missing = [a for a in archs if arch_key(a) not in cache]
        mine = missing[env.rank :: env.world_size]
        records = []
        with partial.open("a") as sink:  # each result is on disk as soon as it exists
            for arch in mine:
                top1, top5 = evaluate(arch)
                cost = subnet_cost(space, arch, num_classes)
                records.append(Candidate(arch, round(cost.mflops, 4), round(cost.params_m, 5), top1, top5).to_record())
                sink.write(json.dumps(records[-1]) + "\n")
                sink.flush()
        if env.world_size > 1:
            gathered: list = [None] * env.world_size
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        if env.is_main and records:
            with path.open("a") as f:
                for record in records:
                    f.write(json.dumps(record) + "\n")
        for record in records:
            cache[arch_key(Candidate.from_record(record).arch)] = record
        if dist.is_initialized():
            dist.barrier()  # rank 0 has appended everything before the partial files go
        partial.unlink(missing_ok=True)
        return [Candidate.from_record(cache[arch_key(a)]) for a in archs]

    sampler = ArchSampler(space, search.seed)
    constrained = FlopsConstrainedSampler(space, sampler, search.min_mflops, search.max_mflops, num_classes)
    seen: set[str] = set()
    population = score([constrained.draw(sampler.random, seen) for _ in range(search.population)])
    say(f"generation 0: {len(population)} candidates, best top-1 {max(c.top1 for c in population):.2f}%")
    for generation in range(1, search.iterations + 1):
        parents = select_parents(population, search.parents, search.bucket_mflops)

        def pick(parents=parents):
            return parents[sampler.index(len(parents))].arch

        children = [constrained.draw(lambda: sampler.crossover(pick(), pick()), seen) for _ in range(search.crossovers)]
        children += [
            constrained.draw(lambda: sampler.mutate(pick(), search.mutation_prob), seen)
            for _ in range(search.mutations)
        ]
        population += score(children)
        say(f"generation {generation}: {len(population)} candidates, best top-1 {max(c.top1 for c in population):.2f}%")

    marked = {}
    if search.mark_models:
        _, named = load_named_archs(search.mark_models)
        inside = {n: a for n, a in named.items() if not a.problems(space)}
        scored = score(list(inside.values()))
        marked = dict(zip(inside, scored))

    if env.is_main:
        json_path, png_path = write_front(population, out, search.bucket_mflops, marked)
        from trainer.evolution import pareto_front

        table = Table(
            title=f"Pareto front of {len(population)} candidates ({search.min_mflops:g}–{search.max_mflops:g} MFLOPs)"
        )
        for col in ("MFLOPs", "params (M)", "res", "top-1", "top-5"):
            table.add_column(col, justify="right")
        for c in pareto_front(population):
            table.add_row(
                f"{c.mflops:.2f}", f"{c.params_m:.3f}", str(c.arch.resolution), f"{c.top1:.2f}", f"{c.top5:.2f}"
            )
        console.print(table)
        console.print(f"front: {json_path}\nplot:  {png_path}")
        for spec in exports:
            export_one(spec, population, marked, evaluate, out, console)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def export_one(spec: str, population, marked, evaluate: CandidateEvaluator, out: Path, console) -> Path:
    """Export a marked model by name or the best front candidate within ``pareto@MFLOPS``."""
    import numpy as np

    from models import load_subnet, save_subnet
    from models.export import export_onnx
    from trainer.evolution import pareto_front

    if spec.startswith("pareto@"):
        budget = float(spec.split("@", 1)[1])
        fitting = [c for c in pareto_front(population) if c.mflops <= budget]
        if not fitting:
            raise SystemExit(f"no Pareto candidate within {budget} MFLOPs")
        chosen, name = max(fitting, key=lambda c: c.top1), f"pareto_{budget:g}mflops"
    elif spec in marked:
        chosen, name = marked[spec], spec
    else:
        raise SystemExit(f"--export {spec}: not a marked model ({sorted(marked)}) nor pareto@MFLOPS")
    model = evaluate.calibrated(chosen.arch).cpu().eval()
    folder = save_subnet(model, out / "exports" / name, extra={"mflops": chosen.mflops, "top1": chosen.top1})
    onnx_path = export_onnx(model, folder)
    reloaded = load_subnet(folder)
    import onnxruntime

    x = torch.randn(2, 3, chosen.arch.resolution, chosen.arch.resolution)
    with torch.no_grad():
        expected = model(x).numpy()
    torch_diff = float(np.abs(reloaded(x).detach().numpy() - expected).max())
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_diff = float(np.abs(session.run(None, {"images": x.numpy()})[0] - expected).max())
    console.print(
        f"exported {name} ({chosen.mflops:.2f} MFLOPs, top-1 {chosen.top1:.2f}%) to {folder}: "
        f"reload max diff {torch_diff:.2e}, ONNX max diff {onnx_diff:.2e}"
    )
    return folder


if __name__ == "__main__":
    sys.exit(main())
