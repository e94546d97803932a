"""The training loop in-process, fast enough for the default suite: steps, the saving rule, epoch
boundaries told by the loader, validation, metrics and resume (one rank, tiny space, 32-pixel digits)."""

from __future__ import annotations

import json

import torch
from trainer_helpers import overrides, run_in_process

from trainer.state.checkpoint import Checkpointer, latest_tag


def test_should_save_rule(tmp_path):
    ckpt = Checkpointer(tmp_path, rank=0, world_size=1, keep=2, every_steps=5)
    assert [s for s in range(1, 16) if ckpt.should_save(s)] == [5, 10, 15]
    assert not ckpt.should_save(10, healthy=False)  # never periodic during a streak of skipped steps
    assert ckpt.should_save(7, last=True) and ckpt.should_save(7, epoch_end=True) and ckpt.should_save(7, stop=True)
    assert ckpt.should_save(7, stop=True, healthy=False)
    ckpt.last_tag = "step000000010"  # what save() records: the same step is never saved twice
    assert not ckpt.should_save(10) and not ckpt.should_save(10, last=True, epoch_end=True, stop=True)


def rank_state(run, tag: str) -> dict:
    return torch.load(run / "checkpoints" / tag / "trainer_rank0.pt", weights_only=False)["loader"]


def test_loop_saves_at_epoch_ends_validates_and_resumes(repo, digits_shards, tmp_path, single_rank):
    # 1,497 images in batches of 64: 23 batches per epoch; 8 per step gives 2 steps, 7 batches dropped.
    run = tmp_path / "run"
    args = {
        "data.batch_size": 64,
        "optimizer.gradient_accumulation_steps": 8,
        "optimizer.max_steps": 3,
        "checkpoint.every_steps": 100,
        "eval.every_epochs": 1,
        "eval.calib_batches": 1,
    }
    trainer, results = run_in_process(repo, overrides(run, digits_shards, **args))
    assert trainer.data.steps_per_epoch == 2 and results["global_step"] == 3 and results["skipped_steps"] == 0
    ckpt = run / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step000000002", "step000000003"]
    assert latest_tag(ckpt) == "step000000003"
    # The epoch end is saved after the loader finished the epoch: it resumes at the next epoch's start.
    assert (rank_state(run, "step000000002")["epoch"], rank_state(run, "step000000002")["position"]) == (1, 0)
    assert (rank_state(run, "step000000003")["epoch"], rank_state(run, "step000000003")["position"]) == (1, 8)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/largest" in r] == [1, 2, 3]
    assert [(r["step"], r["epoch"]) for r in records if "val/top1_largest" in r] == [(2, 0), (3, 1)]
    assert all(0.0 <= r["val/top1_smallest"] <= 100.0 for r in records if "val/top1_smallest" in r)

    # The same command with a larger max_steps resumes from step 3 and goes on in epoch 1.
    trainer, results = run_in_process(repo, overrides(run, digits_shards, **{**args, "optimizer.max_steps": 4}))
    assert trainer.resumed_from == "step000000003" and results["global_step"] == 4
    assert latest_tag(ckpt) == "step000000004"
    assert (rank_state(run, "step000000004")["epoch"], rank_state(run, "step000000004")["position"]) == (2, 0)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(3) == 2  # step 3's loss and validation, once each

    # Rerunning the finished run only validates.
    trainer, results = run_in_process(repo, overrides(run, digits_shards, **{**args, "optimizer.max_steps": 4}))
    assert results["global_step"] == 4 and "val" in results and latest_tag(ckpt) == "step000000004"


def test_every_epoch_summary_reaches_the_metrics_file_with_skipped_samples(repo, tmp_path, single_rank):
    from data_helpers import make_image_folder

    from data_pipeline import prepare as prep

    data = tmp_path / "data"
    prep.prepare(
        str(make_image_folder(tmp_path / "folder", classes=2, per_class=9, corrupt=1)), data, ["webdataset"], quiet=True
    )
    run = tmp_path / "run"
    args = overrides(run, data, **{"data.batch_size": 4, "optimizer.epochs": 2, "optimizer.max_steps": "null"})
    trainer, results = run_in_process(repo, args)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summaries = [r for r in records if "epoch/images" in r]
    assert [r["epoch"] for r in summaries] == [0, 1]  # the last epoch's summary too
    assert summaries[-1]["step"] == results["global_step"] == 2 * trainer.data.steps_per_epoch
    for summary in summaries:
        assert summary["epoch/skipped"] == 1 and summary["epoch/skipped_samples"][0][1] == "train_class_0_broken0"
        assert summary["epoch/images"] == 4 * trainer.data.steps_per_epoch - 1  # the broken image is not trained on


def test_log_reports_time_waiting_for_data(repo, digits_shards, tmp_path, single_rank, monkeypatch):
    import time

    from trainer.loop import Trainer

    steps = Trainer._steps

    def slow_loader(self):
        for item in steps(self):
            time.sleep(0.2)  # a loader that falls behind by 200 ms per step
            yield item

    monkeypatch.setattr(Trainer, "_steps", slow_loader)
    run = tmp_path / "run"
    run_in_process(repo, overrides(run, digits_shards, **{"optimizer.max_steps": 3}))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in records if "loss/largest" in r]
    assert len(steps_logged) == 3
    for r in steps_logged:
        assert 200 <= r["time/data_wait_ms"] < 200 + r["time/step_ms"] + 1000 and r["time/step_ms"] > 0


def test_zero_2_steps_reduce_once_with_the_updates_of_per_backward_reduction(
    repo, digits_shards, tmp_path, single_rank, monkeypatch
):
    """The loop runs a step's backward passes (2 mini-batches × 4 sub-networks) inside ``one_reduction``: under
    ZeRO-2 one bucket reduction per step (``engine.coalesce_grad_reduction``, the default) instead of one per
    backward pass, and the same losses step after step as with DeepSpeed's per-backward reduction."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    calls = []
    original = DeepSpeedZeroOptimizer.reduce_ipg_grads
    monkeypatch.setattr(
        DeepSpeedZeroOptimizer, "reduce_ipg_grads", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    args = {"engine.zero_stage": 2, "optimizer.gradient_accumulation_steps": 2, "optimizer.max_steps": 3}
    losses, reductions = {}, {}
    for coalesce in (True, False):
        run = tmp_path / f"coalesce_{coalesce}"
        calls.clear()
        run_in_process(repo, overrides(run, digits_shards, **args, **{"engine.coalesce_grad_reduction": coalesce}))
        reductions[coalesce] = len(calls)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[coalesce] = [[r[k] for k in sorted(r) if k.startswith("loss/")] for r in records if "loss/largest" in r]
    assert reductions == {True: 3, False: 3 * 2 * 4}
    assert len(losses[True]) == 3 and len(losses[True][0]) == 4
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=1e-6)
    assert losses[True][0] != losses[True][-1]  # the weights did change between the steps compared
