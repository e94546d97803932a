"""Learning-rate schedules against their formulas, written out independently."""

from __future__ import annotations

import math

import pytest

from trainer.runtime.schedule import lr_at


def test_warmup_times_cosine_is_the_reference_rule():
    # The reference: base · w(t) · ½(1 + cos(π t / T)), w linear from 0.001 to 1 over the warmup.
    base, total, warmup = 0.8, 1000, 100
    kw = dict(base_lr=base, total_steps=total, warmup_steps=warmup, schedule="warmup_times_cosine")
    for step in (0, 1, 50, 99, 100, 101, 550, 999, 1000):
        w = 0.001 * (1 - step / warmup) + step / warmup if step < warmup else 1.0
        expected = base * w * 0.5 * (1 + math.cos(math.pi * step / total))
        assert lr_at(step, **kw) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # It differs from warmup-then-cosine right after the warmup: the cosine already ran for 100 steps.
    assert lr_at(100, **kw) < lr_at(100, **{**kw, "schedule": "warmup_then_cosine"}) == pytest.approx(base)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_at(0, base_lr=1.0, total_steps=10, warmup_steps=0, schedule="linear")  # type: ignore[arg-type]
