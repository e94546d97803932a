"""Inference latency of sub-networks: measured on the device at hand, and predicted from a per-block table.

**Measured** (:func:`measure`): the standalone model (:func:`models.build_subnet`; latency does not depend on the
weights' values, so a fresh one stands for an extracted one) in eval mode, timed in one of three backends:

* ``eager``: PyTorch on the CPU, channels-last as the models run (the input is converted by the model, the
  1×1 and depthwise convolutions take the project's kernels), under ``torch.inference_mode``;
* ``onnx``: the model exported to ONNX at a fixed batch and run by ONNX Runtime's CPU execution provider,
  all graph optimisations on, ``intra_op_num_threads`` the same as PyTorch's, one inter-op thread;
* ``cuda``: PyTorch on the GPU, each run timed by CUDA events around it and synchronised (this path has
  not been run in the project's tests, which have no GPU).

Each measurement runs ``warmup`` untimed forwards, then ``runs`` timed ones, and reports the median and the
interquartile range (the spread) in milliseconds.  The thread count is set for the measurement (default: every
core this process may run on, what the trainer gives a single rank) and put back afterwards.

**Predicted** (:class:`LatencyTable`, after Once-for-All's latency tables): a family cuts a sub-network into parts
(:meth:`models.families.Family.latency_parts`: for MBConv the stem, each block at its input size, the head with the
classifier); each distinct part shape is timed once, alone, on an input of its size.  A sub-network's latency is
the sum of its parts' entries plus a fixed overhead: the median over a few calibration architectures of (whole
model measured − sum of its parts), which holds what the parts leave out (the input's layout conversion, the
calls between parts).  ``--correct`` fits ``measured ≈ a · sum + b`` on the calibration architectures instead,
for a sum that is biased in proportion.  A table belongs to one device, backend, thread count, batch, search
space and library version (its :func:`identity`, stored inside); it is saved as
``runs/latency/DEVICE-BACKEND-Tt-bB-SPACE.json`` and refused (or rebuilt with ``--rebuild``) when what it was
built with differs.

CLI (``python -m models.latency --help``)::

    python -m models.latency measure configs/alphanet_models.yaml --json runs/latency/a0_a6.json
    python -m models.latency measure --space alphanet --random 8 --backends eager onnx --batches 1 16
    python -m models.latency table --space alphanet --backend onnx --all-shapes
    python -m models.latency evaluate --space alphanet --backend onnx --held-out 50 --json runs/latency/eval.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fileops import atomic_write_text
from models.families import Arch, LatencyPart, Space, build_subnet, family_of, load_named_archs, load_search_space
from models.sampler import ArchSampler

BACKENDS = ("eager", "onnx", "cuda")
CACHE = Path(__file__).resolve().parent.parent / "runs" / "latency"
"""Where tables are kept unless ``--table`` names a file."""
TABLE_FORMAT = 1


# ---- the device ---------------------------------------------------------------------------------------------------
def default_threads() -> int:
    """The thread count the trainer gives a single rank (``trainer.runtime.distributed.configure_threads``): every
    core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_model() -> str:
    """The CPU's ``model name`` from ``/proc/cpuinfo``, else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def device_name(backend: str) -> str:
    """The processor a backend runs on: the GPU's name for ``cuda``, else the CPU model and the vector instructions
    PyTorch uses on it (virtual machines often report one generic model name for CPUs with and without AVX-512)."""
    if backend == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} {torch.backends.cpu.get_cpu_capability()}"


def slug(text: str) -> str:
    """``text`` as a file-name piece: letters, digits, dots and dashes ("Intel(R) Xeon(R) Processor" →
    "Intel-R-Xeon-R-Processor")."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"


# ---- measuring ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Settings:
    """How a latency is measured."""

    backend: str = "eager"
    """``eager``, ``onnx`` or ``cuda`` (see the module docstring)."""
    batch: int = 1
    """Samples per forward."""
    runs: int = 30
    """Timed forwards; the median and interquartile range are over these."""
    warmup: int = 5
    """Untimed forwards before the timed ones."""
    threads: int = field(default_factory=default_threads)
    """PyTorch's intra-op threads, and ONNX Runtime's."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.backend == "cuda" and not torch.cuda.is_available():
            raise ValueError("backend 'cuda' needs a GPU, and torch sees none")
        if self.batch < 1 or self.runs < 1 or self.warmup < 0 or self.threads < 1:
            raise ValueError(f"need batch, runs, threads >= 1 and warmup >= 0: {self}")


@dataclass(frozen=True, slots=True)
class Timing:
    """One measurement: milliseconds per forward of a batch."""

    backend: str
    batch: int
    threads: int
    median_ms: float
    iqr_ms: float
    """Interquartile range of the timed runs (the spread)."""
    runs: int

    @classmethod
    def of(cls, samples_ms: Sequence[float], settings: Settings) -> Timing:
        q1, median, q3 = np.percentile(np.asarray(samples_ms, dtype=np.float64), [25, 50, 75])
        return cls(settings.backend, settings.batch, settings.threads, float(median), float(q3 - q1), len(samples_ms))


@contextmanager
def torch_threads(threads: int):
    """PyTorch's intra-op thread count set to ``threads`` meanwhile."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _timed(run: Callable[[], Any], settings: Settings) -> list[float]:
    """Milliseconds of each of ``settings.runs`` calls of ``run`` after ``settings.warmup`` untimed ones."""
    for _ in range(settings.warmup):
        run()
    samples = []
    for _ in range(settings.runs):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _timed_cuda(run: Callable[[], Any], settings: Settings) -> list[float]:
    """:func:`_timed` for a GPU: CUDA events around each run, waited for before the next (not run in tests)."""
    for _ in range(settings.warmup):
        run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(settings.runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return samples


def onnx_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """``module`` exported to ONNX (the TorchScript exporter, as :func:`models.export.export_onnx`) at the fixed
    shape of ``example``."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example.contiguous(),), buffer, input_names=["input"], output_names=["output"], dynamo=False
        )
    return buffer.getvalue()


def onnx_session(model: bytes, threads: int):
    """An ONNX Runtime CPU session of ``model`` with ``threads`` intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def measure(
    module: nn.Module, input_shape: Sequence[int], settings: Settings, *, channels_last_input: bool = False
) -> Timing:
    """Latency of ``module`` on a batch of ``settings.batch`` random inputs of ``input_shape`` (one sample's
    (C, H, W)).  ``channels_last_input``: the input arrives channels-last (a part inside a model, whose input the
    model has converted), else contiguous NCHW (what a caller feeds the whole model)."""
    module = module.eval()
    example = torch.randn(settings.batch, *input_shape)
    if channels_last_input and example.ndim == 4:
        example = example.contiguous(memory_format=torch.channels_last)
    with torch_threads(settings.threads):
        if settings.backend == "onnx":
            with torch.no_grad():  # the exporter traces: not under inference_mode
                model = onnx_bytes(module, example)
            session = onnx_session(model, settings.threads)
            feed = {session.get_inputs()[0].name: example.contiguous().numpy()}  # an ONNX graph's input is NCHW
            samples = _timed(lambda: session.run(None, feed), settings)
        elif settings.backend == "cuda":
            module, example = module.cuda(), example.cuda()
            with torch.inference_mode():
                samples = _timed_cuda(lambda: module(example), settings)
        else:
            with torch.inference_mode():
                samples = _timed(lambda: module(example), settings)
    return Timing.of(samples, settings)


def image_shape(arch: Arch) -> tuple[int, int, int]:
    """One input image of ``arch``: (3, resolution, resolution)."""
    return (3, arch.resolution, arch.resolution)


def measure_arch(space: Space, arch: Arch, settings: Settings, num_classes: int = 1000) -> Timing:
    """Latency of ``arch``'s standalone model."""
    return measure(build_subnet(space, arch, num_classes), image_shape(arch), settings)


def random_archs(space: Space, count: int, seed: int, exclude: Iterable[Arch] = ()) -> list[Arch]:
    """``count`` distinct random sub-networks of ``space`` (fewer if the space has fewer), none of ``exclude``."""
    sampler, seen, archs = ArchSampler(space, seed), set(exclude), []
    for _ in range(count * 50):
        if len(archs) == count:
            break
        arch = sampler.random()
        if arch not in seen:
            seen.add(arch)
            archs.append(arch)
    return archs


# ---- the table ----------------------------------------------------------------------------------------------------
class TableMismatch(ValueError):
    """A saved table was built on another device, backend, thread count, batch, space or library version."""


def space_digest(space: Space) -> str:
    return hashlib.sha256(json.dumps(space.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def identity(space: Space, settings: Settings, num_classes: int) -> dict[str, Any]:
    """What a table's entries depend on; a table whose stored identity differs is refused."""
    onnxruntime = None
    if settings.backend == "onnx":
        import onnxruntime as ort

        onnxruntime = ort.__version__
    return {
        "format": TABLE_FORMAT,
        "device": device_name(settings.backend),
        "backend": settings.backend,
        "threads": settings.threads,
        "batch": settings.batch,
        "space": space.name,
        "space_sha256": space_digest(space),
        "num_classes": num_classes,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime,
    }


def table_path(folder: Path, ident: dict[str, Any]) -> Path:
    """``folder/DEVICE-BACKEND-Tt-bB-SPACE.json``."""
    name = f"{slug(ident['device'])}-{ident['backend']}-{ident['threads']}t-b{ident['batch']}-{slug(ident['space'])}"
    return Path(folder) / f"{name}.json"


@dataclass(slots=True)
class LatencyTable:
    """Per-part latencies of one device and backend, and the fixed overhead a whole model adds to their sum."""

    identity: dict[str, Any]
    entries: dict[str, float] = field(default_factory=dict)
    """Part key → median milliseconds of the part alone."""
    spreads: dict[str, float] = field(default_factory=dict)
    """Part key → interquartile range of its runs (ms)."""
    overhead_ms: float | None = None
    """Median of (whole model − sum of its parts) over the calibration architectures; None before calibration."""
    correction: tuple[float, float] | None = None
    """(a, b) of ``measured ≈ a · sum + b`` when fitted (``--correct``); the prediction then uses it instead of
    the overhead."""
    calibration: list[dict[str, Any]] = field(default_factory=list)
    """The calibration architectures: ``{arch, measured_ms, sum_ms}``."""

    def missing(self, parts: Iterable[LatencyPart]) -> list[LatencyPart]:
        """The parts (one per key) without an entry."""
        out: dict[str, LatencyPart] = {}
        for part in parts:
            if part.key not in self.entries:
                out.setdefault(part.key, part)
        return list(out.values())

    def sum_ms(self, parts: Sequence[LatencyPart]) -> float:
        """The sum of the parts' entries (each part counted as often as the model runs it)."""
        absent = [p.key for p in self.missing(parts)]
        if absent:
            raise KeyError(f"{len(absent)} part(s) not in the table, e.g. {absent[0]}; fill it first")
        return math.fsum(self.entries[p.key] for p in parts)

    def predict_parts(self, parts: Sequence[LatencyPart]) -> float:
        """Predicted milliseconds of the model made of ``parts``."""
        total = self.sum_ms(parts)
        if self.correction is not None:
            a, b = self.correction
            return a * total + b
        if self.overhead_ms is None:
            raise ValueError("the table has no overhead yet: calibrate it on whole models first")
        return total + self.overhead_ms

    def predict(self, space: Space, arch: Arch) -> float:
        """Predicted milliseconds of ``arch``."""
        return self.predict_parts(family_of(space).latency_parts(space, arch, self.identity["num_classes"]))

    def settings(self, runs: int, warmup: int) -> Settings:
        return Settings(self.identity["backend"], self.identity["batch"], runs, warmup, self.identity["threads"])

    def fill(
        self,
        parts: Iterable[LatencyPart],
        settings: Settings,
        *,
        save_to: Path | None = None,
        log: Callable[[str], None] | None = None,
    ) -> int:
        """Time every part without an entry, once per key; saves to ``save_to`` every 20 entries and at the end (so
        an interrupted build goes on from there).  Returns the number timed."""
        todo = self.missing(parts)
        for i, part in enumerate(todo, 1):
            timing = measure(part.build(), part.input_shape, settings, channels_last_input=True)
            self.entries[part.key], self.spreads[part.key] = timing.median_ms, timing.iqr_ms
            if save_to is not None and i % 20 == 0:
                self.save(save_to)
            if log is not None and (i % 20 == 0 or i == len(todo)):
                log(f"timed {i}/{len(todo)} parts")
        if save_to is not None and todo:
            self.save(save_to)
        return len(todo)

    def calibrate(
        self, space: Space, archs: Sequence[Arch], settings: Settings, *, correct: bool = False, **fill_options
    ) -> None:
        """Measure ``archs`` whole and set the overhead (and, with ``correct``, the linear correction)."""
        num_classes = self.identity["num_classes"]
        family = family_of(space)
        if not archs:
            raise ValueError("calibration needs at least one architecture")
        self.calibration = []
        for arch in archs:
            parts = family.latency_parts(space, arch, num_classes)
            self.fill(parts, settings, **fill_options)
            measured = measure_arch(space, arch, settings, num_classes).median_ms
            self.calibration.append({"arch": arch.to_dict(), "measured_ms": measured, "sum_ms": self.sum_ms(parts)})
        gaps = [c["measured_ms"] - c["sum_ms"] for c in self.calibration]
        self.overhead_ms = float(np.median(gaps))
        self.correction = None
        if correct:
            if len(self.calibration) < 3:
                raise ValueError("a linear correction needs at least 3 calibration architectures")
            sums = np.array([c["sum_ms"] for c in self.calibration])
            measured = np.array([c["measured_ms"] for c in self.calibration])
            a, b = np.polyfit(sums, measured, 1)
            self.correction = (float(a), float(b))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["correction"] = list(self.correction) if self.correction is not None else None
        return data

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: Path, expected: dict[str, Any] | None = None) -> LatencyTable:
        """The table saved at ``path``; :class:`TableMismatch` when its identity differs from ``expected``."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        stored = data.get("identity", {})
        if expected is not None and stored != expected:
            differences = [
                f"{key}: table {stored.get(key)!r}, now {expected.get(key)!r}"
                for key in sorted(set(stored) | set(expected))
                if stored.get(key) != expected.get(key)
            ]
            raise TableMismatch(f"{path} was built under another identity ({'; '.join(differences)})")
        correction = data.get("correction")
        return cls(
            identity=stored,
            entries={str(k): float(v) for k, v in data.get("entries", {}).items()},
            spreads={str(k): float(v) for k, v in data.get("spreads", {}).items()},
            overhead_ms=None if data.get("overhead_ms") is None else float(data["overhead_ms"]),
            correction=None if correction is None else (float(correction[0]), float(correction[1])),
            calibration=list(data.get("calibration", [])),
        )


def open_table(path: Path, expected: dict[str, Any], *, rebuild: bool = False) -> LatencyTable:
    """The table at ``path`` when there is one built under ``expected`` (:class:`TableMismatch` when it was
    built under another identity), an empty one when there is none or ``rebuild``."""
    if Path(path).exists() and not rebuild:
        return LatencyTable.load(path, expected)
    return LatencyTable(identity=dict(expected))


# ---- evaluation ---------------------------------------------------------------------------------------------------
def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy import stats

    return float(stats.kendalltau(x, y).statistic) if len(x) >= 2 else float("nan")


def prediction_metrics(predicted: Sequence[float], measured: Sequence[float], flops: Sequence[float]) -> dict:
    """Mean absolute % error, share within ±10 %, Kendall τ of the prediction against the measurement, and
    FLOPs' own τ against it."""
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    errors = np.abs(p - m) / m
    return {
        "count": len(m),
        "mape_pct": float(100 * errors.mean()),
        "within_10pct": float((errors <= 0.10).mean()),
        "kendall_tau": kendall_tau(p, m),
        "flops_kendall_tau": kendall_tau(flops, m),
    }


def evaluate(
    table: LatencyTable, space: Space, archs: Sequence[Arch], settings: Settings, **fill_options
) -> dict[str, Any]:
    """Predicted against measured latency of ``archs`` (held out: not the table's calibration architectures);
    parts missing from the table are timed first (alone, as any entry).  Returns the metrics and one row per
    arch."""
    from models.flops import subnet_cost

    num_classes = table.identity["num_classes"]
    family = family_of(space)
    rows = []
    for arch in archs:
        parts = family.latency_parts(space, arch, num_classes)
        table.fill(parts, settings, **fill_options)
        measured = measure_arch(space, arch, settings, num_classes)
        rows.append(
            {
                "arch": arch.to_dict(),
                "mflops": subnet_cost(space, arch, num_classes).mflops,
                "measured_ms": measured.median_ms,
                "measured_iqr_ms": measured.iqr_ms,
                "predicted_ms": table.predict_parts(parts),
            }
        )
    metrics = prediction_metrics(
        [r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows], [r["mflops"] for r in rows]
    )
    return {"identity": table.identity, "metrics": metrics, "archs": rows}


# ---- CLI ----------------------------------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _named_archs(args) -> tuple[Space, dict[str, Arch]]:
    if args.models:
        return load_named_archs(args.models)
    if not args.space:
        raise SystemExit("error: give a model table YAML or --space NAME --random N")
    space = load_search_space(args.space)
    archs = random_archs(space, args.random, args.seed)
    return space, {f"random{i}": arch for i, arch in enumerate(archs)}


def _cell(timing: dict) -> str:
    return f"{timing['median_ms']:.3f} ± {timing['iqr_ms']:.3f}"


def run_measure(args) -> int:
    from models.flops import subnet_cost

    space, archs = _named_archs(args)
    settings = [
        Settings(backend, batch, args.runs, args.warmup, args.threads)
        for backend in args.backends
        for batch in args.batches
    ]
    rows = []
    for name, arch in archs.items():
        cost = subnet_cost(space, arch, args.num_classes)
        row = {"name": name, "resolution": arch.resolution, "mflops": cost.mflops, "params_m": cost.params_m}
        row["arch"], row["latency"] = arch.to_dict(), {}
        for s in settings:
            row["latency"][f"{s.backend}@b{s.batch}"] = asdict(measure_arch(space, arch, s, args.num_classes))
        rows.append(row)
        _log(f"{name}: " + ", ".join(f"{k} {_cell(v)} ms" for k, v in row["latency"].items()))

    from rich.console import Console
    from rich.table import Table

    gpu = torch.cuda.get_device_name() if "cuda" in args.backends else None
    device = cpu_model() + (f" / {gpu}" if gpu else "")
    table = Table(title=f"latency (ms, median ± IQR of {args.runs} runs) on {device}, {args.threads} threads")
    for column in ("model", "res", "MFLOPs", "params (M)", *(f"{s.backend} b{s.batch}" for s in settings)):
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        cells = [_cell(row["latency"][f"{s.backend}@b{s.batch}"]) for s in settings]
        table.add_row(row["name"], str(row["resolution"]), f"{row['mflops']:.1f}", f"{row['params_m']:.2f}", *cells)
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # a file or pipe gets whole rows
    if args.json:
        record = {"cpu": cpu_model(), "gpu": gpu, "threads": args.threads, "torch": torch.__version__, "models": rows}
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    return 0


def _table_for(args, space: Space) -> tuple[LatencyTable, Path, Settings]:
    settings = Settings(args.backend, args.batch, args.runs, args.warmup, args.threads)
    expected = identity(space, settings, args.num_classes)
    path = Path(args.table) if args.table else table_path(CACHE, expected)
    try:
        table = open_table(path, expected, rebuild=args.rebuild)
    except TableMismatch as exc:
        raise SystemExit(f"error: {exc}; pass --rebuild to replace it") from None
    return table, path, settings


def _calibrate(args, table: LatencyTable, space: Space, path: Path, settings: Settings, *, force: bool) -> None:
    if table.overhead_ms is not None and not force:
        return
    extremes = [space.smallest(), space.largest()][: args.calibration]
    archs = [*extremes, *random_archs(space, args.calibration - len(extremes), args.seed, exclude=extremes)]
    _log(f"calibrating the overhead on {len(archs)} whole models")
    table.calibrate(space, archs, settings, correct=args.correct, save_to=path, log=_log)
    table.save(path)
    _log(
        f"overhead {table.overhead_ms:.3f} ms" + (f", correction a, b = {table.correction}" if table.correction else "")
    )


def run_table(args) -> int:
    space = load_search_space(args.space)
    table, path, settings = _table_for(args, space)
    if args.all_shapes:
        parts = family_of(space).all_latency_parts(space, args.num_classes)
        _log(f"{len(table.missing(parts))} of {len(parts)} part shapes to time")
        table.fill(parts, settings, save_to=path, log=_log)
    _calibrate(args, table, space, path, settings, force=args.recalibrate or (args.correct and not table.correction))
    print(f"{path}: {len(table.entries)} entries, overhead {table.overhead_ms:.3f} ms")
    return 0


def run_evaluate(args) -> int:
    space = load_search_space(args.space)
    table, path, settings = _table_for(args, space)
    _calibrate(args, table, space, path, settings, force=args.recalibrate or (args.correct and not table.correction))
    calibration = [space.arch_from_dict(c["arch"]) for c in table.calibration]
    held_out = random_archs(space, args.held_out, args.seed + 1, exclude=calibration)
    _log(f"evaluating on {len(held_out)} held-out architectures")
    result = evaluate(table, space, held_out, settings, save_to=path, log=_log)
    m = result["metrics"]
    print(
        f"{path.name}: {m['count']} held-out archs; mean |error| {m['mape_pct']:.1f} %, "
        f"within ±10 %: {100 * m['within_10pct']:.0f} %, Kendall τ {m['kendall_tau']:.3f} (FLOPs: {m['flops_kendall_tau']:.3f})"
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def _timing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=30, help="timed forwards per measurement (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed forwards before them (default 5)")
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="intra-op threads (default: the cores this process may use)",
    )
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")


def _table_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", required=True, help="search space name or YAML")
    parser.add_argument("--backend", choices=BACKENDS, default="eager")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--table", type=Path, help=f"table file (default: {CACHE}/DEVICE-BACKEND-Tt-bB-SPACE.json)")
    parser.add_argument("--rebuild", action="store_true", help="start a new table even if one is saved")
    parser.add_argument("--calibration", type=int, default=5, help="whole models that measure the overhead (>= 1)")
    parser.add_argument("--recalibrate", action="store_true", help="measure the overhead again")
    parser.add_argument("--correct", action="store_true", help="fit measured ≈ a·sum + b on the calibration models")
    parser.add_argument("--seed", type=int, default=0, help="calibration archs' seed (held-out: seed + 1)")
    _timing_options(parser)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.latency", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    measure_cmd = commands.add_parser("measure", help="measure whole models: a model table or random ones")
    measure_cmd.add_argument("models", nargs="?", help="model table YAML, e.g. configs/alphanet_models.yaml")
    measure_cmd.add_argument("--space", help="search space name or YAML, with --random")
    measure_cmd.add_argument("--random", type=int, default=8, help="random sub-networks of --space (default 8)")
    measure_cmd.add_argument("--seed", type=int, default=0)
    measure_cmd.add_argument(
        "--backends", nargs="+", choices=BACKENDS, default=None, help="default: eager onnx (+ cuda)"
    )
    measure_cmd.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="default: 1 16")
    measure_cmd.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    _timing_options(measure_cmd)

    table_cmd = commands.add_parser("table", help="build (or extend) a per-part latency table and its overhead")
    table_cmd.add_argument("--all-shapes", action="store_true", help="time every part shape of the space")
    _table_options(table_cmd)

    evaluate_cmd = commands.add_parser("evaluate", help="predicted vs measured latency on held-out random archs")
    evaluate_cmd.add_argument("--held-out", type=int, default=30, help="held-out random architectures (default 30)")
    evaluate_cmd.add_argument("--json", type=Path, help="write metrics and rows to this JSON file")
    _table_options(evaluate_cmd)

    args = parser.parse_args(argv)
    if getattr(args, "calibration", 1) < 1:
        parser.error("--calibration must be at least 1")
    if args.command == "measure":
        if args.backends is None:
            args.backends = ["eager", "onnx", *(["cuda"] if torch.cuda.is_available() else [])]
        return run_measure(args)
    return run_table(args) if args.command == "table" else run_evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
