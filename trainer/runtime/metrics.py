"""Rank-0 observability: a rich live display (or plain lines when not on a terminal), each line timestamped and
kept in the run folder (``console.log``), JSONL, and the sinks of ``trainer.runtime.sinks`` (TensorBoard, W&B,
MLflow)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fileops import atomic_write_text
from trainer.runtime.sinks import Sink

METRICS_FILE = "metrics.jsonl"
CONSOLE_LOG = "console.log"
"""Every line the run printed on rank 0, with its date and time (appended across resumes)."""


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} days"


def _record(line: str) -> dict | None:
    """The JSON object on ``line``, or None for a line a kill cut short (or anything else unreadable)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop records of steps beyond ``after_step`` (left by a run that died after its last checkpoint) and
    lines cut short by a kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        record = _record(line)
        if record is not None and record.get("step", 0) <= after_step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class MetricsLogger:
    """Does nothing on ranks other than 0.  ``sinks`` receive every record's numbers (``build_sinks``)."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int, sinks: Sequence[Sink] = ()):
        self.enabled = enabled
        self.console = Console()
        if not self.console.is_terminal:
            self.console = Console(width=200, soft_wrap=True)  # log files: one record per line
        self.total_steps = total_steps
        self._progress: Progress | None = None
        self._sinks = list(sinks) if enabled else []
        self._jsonl = None
        self._log = None
        if not enabled:
            return
        path = Path(run_dir) / METRICS_FILE
        truncate_jsonl(path, start_step)
        self._jsonl = path.open("a")
        self._log = (Path(run_dir) / CONSOLE_LOG).open("a")
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task("", total=total_steps, completed=start_step, epoch="")
            self._progress.start()
        self._last_time, self._last_step = time.perf_counter(), start_step
        self._eta_from: tuple[float, int] | None = None
        """(time, step) at the end of the first logged window: the ETA's rate leaves out its one-time costs."""

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"{time.strftime('%H:%M:%S')} {message}", highlight=False)
            self._keep(message)

    def _keep(self, message: str) -> None:
        """``message`` into RUN/console.log, dated."""
        self._log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        self._log.flush()

    def log_step(self, step: int, epoch: int, values: dict[str, float], images: int) -> None:
        """Record step metrics; ``images`` is the global number processed since the previous call."""
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = max(1e-9, now - self._last_time)
        rate = images / elapsed
        eta = None
        if self._eta_from is None:
            self._eta_from = (now, step)  # the first window holds one-time costs (kernel builds, warm-up)
        elif step > self._eta_from[1]:
            eta = (self.total_steps - step) * (now - self._eta_from[0]) / (step - self._eta_from[1])
        self._last_time, self._last_step = now, step
        self.log_record({"step": step, "epoch": epoch, **values, "images_per_s": rate})
        short = " ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in values.items() if k.startswith("loss/"))
        kd = values.get("kd_div/smallest")
        text = (
            f"lr={values.get('lr', 0):.4f} {short}"
            + (f" kd(smallest)={kd:.3f}" if kd is not None else "")
            + f" {rate:.0f} img/s"
        )
        if "time/data_wait_ms" in values:
            text += f" data wait {values['time/data_wait_ms']:.0f}/{values['time/step_ms']:.0f} ms"
        line = f"step {step}/{self.total_steps} epoch {epoch} {text} eta {eta_text(eta)}"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, description=text, epoch=f"epoch {epoch}")
            self._keep(line)
        else:
            self.print(line)

    def log_validation(self, step: int, epoch: int, results: dict[str, dict[str, float]]) -> None:
        """``{network: {"top1", "top5", "samples"}}`` as a record and one console line."""
        scores = {f"val/{k}_{name}": v for name, r in results.items() for k, v in r.items() if k != "samples"}
        self.log_record({"step": step, "epoch": epoch, **scores})
        line = " ".join(f"{name} {r['top1']:.2f}%" for name, r in results.items())
        images = next(iter(results.values()))["samples"]
        self.print(f"epoch {epoch} step {step}: val top-1 {line} ({images} images)")

    def log_record(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._sinks:
            values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
            for sink in self._sinks:
                sink.log(record.get("step", 0), values)

    def close(self, *, failed: bool = False) -> None:
        """``failed``: the run stops on an error (W&B and MLflow mark their run so)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        for sink in self._sinks:
            sink.close(failed=failed)
        self._sinks = []
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._log is not None:
            self._log.close()
            self._log = None
