"""The run's console: timestamped lines, kept in RUN/console.log, an ETA measured after the first window."""

from __future__ import annotations

import re

from trainer.runtime import metrics
from trainer.runtime.metrics import CONSOLE_LOG, MetricsLogger


def test_lines_are_timestamped_and_kept_and_the_eta_skips_the_first_window(tmp_path, monkeypatch, capsys):
    clock = iter([0.0, 100.0, 110.0, 120.0])  # start; a slow first window (one-time costs); then 10 s per 10 steps
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    log = MetricsLogger(tmp_path, enabled=True, total_steps=100, start_step=0)
    log.print("hello")
    for step in (10, 20, 30):
        log.log_step(step, 0, {"lr": 0.1, "loss/largest": 1.0}, images=640)
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines)
    etas = [line.rsplit("eta ", 1)[1] for line in lines[1:]]
    # After the first window: 10 steps per 10 s from step 10, so 80 steps left at step 20 take 80 s.
    assert etas == ["–", "00:01:20", "00:01:10"]
    kept = (tmp_path / CONSOLE_LOG).read_text().splitlines()
    assert len(kept) == 4 and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in kept)
    assert kept[0].endswith(" hello") and "step 30/100" in kept[3]


def test_other_ranks_write_nothing(tmp_path, capsys):
    log = MetricsLogger(tmp_path, enabled=False, total_steps=10, start_step=0)
    log.print("x")
    log.close()
    assert capsys.readouterr().out == "" and not (tmp_path / CONSOLE_LOG).exists()
