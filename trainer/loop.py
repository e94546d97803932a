"""The Trainer: builds everything in a fixed order, then steps, checkpoints and validates.

Build order: distributed → model → engine → data → checkpointer (+ resume) → logger.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline import DataError, EpochSummary, build_loader
from data_pipeline.integrity import DataWatch, split_files
from data_pipeline.manifest import has_manifest, read_manifest
from trainer import host_allocator
from trainer.checkpoint import Checkpointer, rng_state, set_rng_state
from trainer.collectives import all_reduce_
from trainer.config import RunConfig, model_hash, write_resolved
from trainer.distributed import configure_threads, init_distributed, local_world_size, resolve
from trainer.ds_config import global_batch_size
from trainer.engine import build_engine
from trainer.host_allocator import keep_freed_memory
from trainer.metrics import MetricsLogger
from trainer.run_folder import RunFolderLock, check_config_change, record_config_change
from trainer.schedule import lr_at
from trainer.tasks import RunContext, build_task


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps); the message says where to resume from."""


class StepTiming:
    """Per-step wall time split into waiting for the loader and the step itself, averaged over a log window
    (as tensors, so the log reports the mean over ranks)."""

    def __init__(self) -> None:
        self.wait = self.step = 0.0
        self.steps = 0
        self._mark = time.perf_counter()

    def waiting(self) -> None:
        self._mark = time.perf_counter()

    def batches_ready(self) -> None:
        now = time.perf_counter()
        self.wait += now - self._mark
        self._mark = now

    def step_done(self) -> None:
        self.step += time.perf_counter() - self._mark
        self.steps += 1

    def window(self) -> dict[str, torch.Tensor]:
        """``time/data_wait_ms`` and ``time/step_ms`` per step since the previous call."""
        n = max(1, self.steps)
        values = {
            "time/data_wait_ms": torch.tensor(1e3 * self.wait / n),
            "time/step_ms": torch.tensor(1e3 * self.step / n),
        }
        self.wait = self.step = 0.0
        self.steps = 0
        return values


class Trainer:
    """Builds everything in a fixed order (distributed → model → engine → data → checkpointer + resume →
    logger), then :meth:`train` steps, logs, validates and saves."""

    def __init__(
        self,
        config: RunConfig,
        *,
        local_rank_arg: int | None = None,
        allow_config_change: bool = False,
        notes: list[str] | None = None,
    ):
        """``notes``: lines to print when training starts (e.g. the config's deprecation notes)."""
        self.config = config
        self.notes: list[str] = list(notes or [])
        self.config_changes = check_config_change(config, Path(config.run_dir), allow=allow_config_change)
        self.lock = RunFolderLock(Path(config.run_dir))
        try:
            self._build_distributed(local_rank_arg)
            self._build_model()
            self._build_engine()
            self._build_data()
            self._attach_task()
            self._build_checkpointer_and_resume()
            self._build_logger()
        except BaseException:
            self.lock.release()
            raise

    # ------------------------------------------------------------------------------------------ build
    def _build_distributed(self, local_rank_arg: int | None) -> None:
        self.env = resolve(local_rank_arg=local_rank_arg)
        # before the process group starts its threads (trainer/run.py has given them one arena already)
        self.kept_freed_memory = self.config.trainer.keep_freed_host_memory and keep_freed_memory()
        self.device = init_distributed(self.env, self.config.trainer.dist_timeout_s)
        self.rank, self.world = self.env.rank, self.env.world_size
        if self.env.is_main:  # before any collective: a second run on this folder stops here, at once
            self.lock.acquire()
        self.threads = configure_threads(self.config.trainer.threads_per_rank, local_world_size())
        random.seed(self.config.seed + self.rank)
        np.random.seed(self.config.seed + self.rank)

    def _build_model(self) -> None:
        seed = self.config.seed
        torch.manual_seed(seed)  # identical initial weights on every rank ...
        self.task = build_task(self.config, rank=self.rank, world=self.world, device=self.device)
        self.trained = self.task.trained
        if hasattr(self.trained, "channels_last"):  # our networks (a torchvision student keeps its layout)
            self.trained.channels_last = self.config.trainer.channels_last
        torch.manual_seed(seed + 1000 * (self.rank + 1))  # ... then per-rank dropout / drop-path draws

    def _build_engine(self) -> None:
        tc, micro = self.config.trainer, self.config.data.batch_size
        self.global_batch = global_batch_size(tc, micro_batch=micro, world_size=self.world)
        self.base_lr = tc.lr_per_256 * self.global_batch / 256
        built = build_engine(self.trained, tc, micro_batch=micro, world_size=self.world, lr=self.base_lr)
        self.engine, self.module, self.optimizer = built.engine, built.module, built.optimizer

    def _build_data(self) -> None:
        data, tc, seed = self.config.data, self.config.trainer, self.config.seed
        shard = {"rank": self.rank, "world_size": self.world}
        self.train_loader = build_loader(data, data.train_split, train=True, seed=seed, **shard)
        self.val_loader = build_loader(data, data.val_split, train=False, seed=seed, **shard)
        self.calib_loader = build_loader(data, data.train_split, train=True, seed=seed + 1, **shard)
        self.steps_per_epoch = len(self.train_loader) // tc.gradient_accumulation_steps
        if self.steps_per_epoch < 1:
            per_step = data.batch_size * self.world * tc.gradient_accumulation_steps
            raise DataError(
                f"one optimizer step needs {per_step} training images (data.batch_size {data.batch_size} × "
                f"{self.world} rank(s) × trainer.gradient_accumulation_steps {tc.gradient_accumulation_steps}); "
                f"split '{data.train_split}' of {data.root} has {self.train_loader.num_samples}"
            )
        if has_manifest(data.root):
            classes = read_manifest(data.root).get("classes") or []
            if len(classes) > self.config.model.num_classes:
                raise DataError(
                    f"{data.root} has {len(classes)} classes but model.num_classes is "
                    f"{self.config.model.num_classes}: set model.num_classes to at least {len(classes)}"
                )
        self.data_watch = DataWatch(
            data.root,
            split_files(data.root, [data.train_split, data.val_split]),
            hash_files=data.verify == "background" and self.env.local_rank == 0,
        )
        self.total_steps = tc.epochs * self.steps_per_epoch
        self.warmup_steps = round(tc.warmup_epochs * self.steps_per_epoch)
        self.final_step = min(self.total_steps, tc.max_steps) if tc.max_steps else self.total_steps

    def _attach_task(self) -> None:
        self.task.attach(
            RunContext(
                config=self.config,
                engine=self.engine,
                module=self.module,
                device=self.device,
                rank=self.rank,
                world=self.world,
                train_loader=self.train_loader,
                val_loader=self.val_loader,
                calib_loader=self.calib_loader,
                steps_per_epoch=self.steps_per_epoch,
                total_steps=self.total_steps,
                run_dir=Path(self.config.run_dir),
            )
        )
        self.notes += self.task.notes
        self.what = self.task.describe() + (" (bf16 autocast)" if self.config.trainer.bf16_autocast else "")

    def _build_checkpointer_and_resume(self) -> None:
        tc = self.config.trainer
        self.run_dir = Path(self.config.run_dir)
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints",
            self.rank,
            self.world,
            keep=tc.keep_checkpoints,
            every_steps=tc.checkpoint_every_steps,
        )
        self.model_hash = model_hash(self.config)  # with the student and teacher of a one-network run
        self.global_step = 0
        self.bad_steps = 0
        self.skipped_total = 0
        self.resume_warnings: list[str] = []
        self.resumed_from = self._maybe_resume()

    def _build_logger(self) -> None:
        if self.env.is_main:
            record_config_change(self.run_dir, self.config_changes, self.global_step)
            write_resolved(self.config, self.run_dir)
        self.log = MetricsLogger(
            self.run_dir,
            enabled=self.env.is_main,
            total_steps=self.final_step,
            start_step=self.global_step,
            tensorboard=self.config.trainer.tensorboard,
        )
        self._stop_signal = 0
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    # ------------------------------------------------------------------------------------------ state
    def _client_state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "model_hash": self.model_hash,
            "world_size": self.world,
            "bad_steps": self.bad_steps,
            "skipped_total": self.skipped_total,
            **self.task.client_state(),
        }

    def _rank_state(self) -> dict[str, Any]:
        return {"loader": self.train_loader.state_dict(), "rng": rng_state(), **self.task.rank_state()}

    def _maybe_resume(self) -> str | None:
        resumed = self.checkpointer.resume(self.engine)
        if resumed is None:
            return None
        self.resume_warnings = [f"skipped unreadable checkpoint: {line}" for line in resumed.skipped]
        tag, client, rank_state = resumed.tag, resumed.client_state, resumed.rank_state
        if client.get("model_hash") != self.model_hash:
            raise TrainingStopped(
                f"checkpoint {self.checkpointer.dir / tag} was written for a different model config "
                f"(hash {client.get('model_hash')} vs {self.model_hash}); use a new run_dir or the original config"
            )
        if client.get("world_size") != self.world:
            raise TrainingStopped(
                f"checkpoint {tag} was written by {client.get('world_size')} ranks, this run has {self.world}"
            )
        self.global_step = int(client["global_step"])
        self.bad_steps, self.skipped_total = int(client["bad_steps"]), int(client["skipped_total"])
        self.train_loader.load_state_dict(rank_state["loader"])
        self.task.load_state(client, rank_state)
        set_rng_state(rank_state["rng"])
        return tag

    def save(self) -> str:
        return self.checkpointer.save(self.engine, self.global_step, self._client_state(), self._rank_state())

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _requeue_if_asked(self) -> bool:
        """Under slurm/alphanet.sh: rank 0 requeues the job once the checkpoint is committed (SLURM
        kills the job at once on requeue, so this must come last)."""
        job = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("ALPHANET_REQUEUE_ON_SIGNAL") != "1" or not job:
            return False
        if self.env.is_main:
            self.log.print(f"requeueing SLURM job {job}")
            self.log.close()
            subprocess.run(["scontrol", "requeue", job], check=False)
        return True

    def _agree(self, *flags: bool) -> list[bool]:
        """For each flag: true on every rank when it is true on any rank (one all-reduce)."""
        values = torch.tensor([1.0 if flag else 0.0 for flag in flags])
        return [bool(v) for v in all_reduce_(values, dist.ReduceOp.MAX).tolist()]

    def _stop_for_bad_data(self, problem: str | None) -> None:
        """Every rank raises the same DataError naming the rank(s) that found the problem (all ranks are here,
        so gathering the messages is safe)."""
        problems = [problem]
        if dist.is_initialized() and self.world > 1:
            problems = [None] * self.world
            dist.all_gather_object(problems, problem)
        found = [f"rank {r}: {p}" for r, p in enumerate(problems) if p]
        last = self.checkpointer.last_tag
        raise DataError(
            "; ".join(dict.fromkeys(found))
            + f" (stopped at step {self.global_step}; last committed checkpoint: "
            + f"{self.checkpointer.dir / last if last else 'none'})"
        )

    def _check_data_before_commit(self) -> None:
        """Wait for the background hashes (data.verify: background) and stop if any rank found bad data."""
        if self.data_watch.hashing and self.env.is_main:
            self.log.print("waiting for the data check (sha256 of every data file) before committing a checkpoint")
        problem = self.data_watch.problem(wait=True)
        if self._agree(problem is not None)[0]:
            self._stop_for_bad_data(problem)

    # ------------------------------------------------------------------------------------------ steps
    def set_lr(self, step: int) -> float:
        tc = self.config.trainer
        lr = lr_at(
            step,
            base_lr=self.base_lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            schedule=tc.lr_schedule,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, batches: list) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation_steps`` mini-batches: the task's passes, then the step."""
        lr = self.set_lr(self.global_step)
        sums = self.task.step(batches, lr, self.global_step)
        self.engine.step()
        skipped = self.optimizer.last_step_skipped
        self.global_step += 1
        metrics, lines = self.task.after_step(self.global_step)
        sums.update(metrics)
        for line in lines:
            self.log.print(line)
        self.skipped_total += int(skipped)
        self.bad_steps = self.bad_steps + 1 if skipped else 0
        return {"lr": lr, "skipped": float(skipped), **sums}

    def _reduce_for_log(self, values: dict) -> dict[str, float]:
        keys = sorted(k for k, v in values.items() if isinstance(v, torch.Tensor))
        if keys:
            stacked = torch.stack([values[k].float().cpu() for k in keys])
            if dist.is_initialized():
                all_reduce_(stacked)
                stacked /= self.world
            values = {**values, **dict(zip(keys, stacked.tolist()))}
        return {k: float(v) for k, v in values.items()}

    def _steps(self) -> Iterator[tuple[list, int, bool]]:
        """(mini-batches of one optimizer step, epoch, whether the step ends the epoch), epoch after epoch."""
        while True:
            epoch = self.train_loader.epoch
            for batches, epoch_end in self.train_loader.groups(self.config.trainer.gradient_accumulation_steps):
                yield batches, epoch, epoch_end

    def _check_bad_steps(self) -> None:
        if self.bad_steps >= self.config.trainer.max_consecutive_bad_steps:
            last = self.checkpointer.last_tag
            raise TrainingStopped(
                f"{self.bad_steps} consecutive steps had a non-finite loss or gradient (step {self.global_step}); "
                f"last good checkpoint: {self.checkpointer.dir / last if last else 'none yet'}"
            )

    def _log_epoch_summary(self) -> None:
        """Images, skipped samples (shard, key, reason) and indexing problems of the epoch that just ended,
        over all ranks: on the console and as a ``metrics.jsonl`` / TensorBoard record."""
        summary = self.train_loader.last_summary
        if summary is None:
            return
        summaries = [summary]
        if dist.is_initialized() and self.world > 1:
            summaries = [None] * self.world
            dist.all_gather_object(summaries, summary)
        merged = EpochSummary.merged(summaries)
        self.log.print(merged.text())
        self.log.log_record({"step": self.global_step, **merged.record()})

    def _eval_due(self, epoch: int) -> bool:
        every = self.config.trainer.eval_every_epochs
        return bool(every) and (epoch + 1) % every == 0

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        """Step → log → (stop: save and return) → validate when due → save when due, until the final step."""
        tc = self.config.trainer
        for warning in self.resume_warnings:
            self.log.print(warning)
        for key, (old, new) in self.config_changes.items():
            self.log.print(f"config change on resume: {key}: {old!r} -> {new!r}")
        for note in self.notes:
            self.log.print(note)
        if self.resumed_from:
            self.log.print(f"resumed from {self.checkpointer.dir / self.resumed_from} at step {self.global_step}")
        self.log.print(
            f"training {self.what}: {self.world} rank(s), global batch {self.global_batch}, "
            f"{self.steps_per_epoch} steps/epoch, {self.final_step} steps, lr {self.base_lr:.4f}, "
            f"{self.threads} thread(s) per rank, {self.config.data.num_workers} data worker(s) per rank"
            + (", freed host memory kept" if self.kept_freed_memory else "")
            + (" (one malloc arena)" if self.kept_freed_memory and host_allocator.one_arena else "")
        )
        results: dict[str, Any] = {"global_step": self.global_step, "skipped_steps": self.skipped_total}
        if self.global_step >= self.final_step:  # rerunning a finished run: only validate
            results["val"] = self.validate(self.train_loader.epoch)
            return results
        images_since_log = 0
        timing = StepTiming()
        for batches, epoch, epoch_end in self._steps():
            timing.batches_ready()
            values = self.train_step(batches)
            timing.step_done()
            results.update(global_step=self.global_step, skipped_steps=self.skipped_total)
            last = self.global_step >= self.final_step
            images_since_log += sum(len(b) for b in batches) * self.world
            if self.global_step % tc.log_every_steps == 0 or last:
                values.update(timing.window())
                self.log.log_step(self.global_step, epoch, self._reduce_for_log(values), images_since_log)
                images_since_log = 0
            self._check_bad_steps()
            if epoch_end:
                self._log_epoch_summary()
            problem = self.data_watch.problem()
            stop, bad_data = self._agree(self._stop_signal != 0, problem is not None)
            if bad_data:
                self._stop_for_bad_data(problem)
            if stop:
                tag = self.save()
                self.log.print(
                    f"signal received: saved {self.checkpointer.dir / tag}; rerun the same command to resume"
                )
                return {**results, "stopped_by_signal": True, "requeued": self._requeue_if_asked()}
            if last or (epoch_end and self._eval_due(epoch)):
                results["val"] = self.validate(epoch)
            if self.checkpointer.should_save(
                self.global_step, last=last, epoch_end=epoch_end, healthy=self.bad_steps == 0
            ):
                self._check_data_before_commit()
                self.save()
            if last:
                self._save_final()
                return results
            timing.waiting()
        raise AssertionError("unreachable: the step iterator never ends")

    def validate(self, epoch: int) -> dict[str, dict[str, float]]:
        """Top-1/top-5 of the largest and smallest sub-networks after BN recalibration.  Runs on a forked torch
        RNG (building the standalone copies draws initial weights), so validating never changes the training
        stream: a run stopped at ``max_steps`` (validated, then saved) and extended continues bit-identically."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._validate(epoch)

    def _validate(self, epoch: int) -> dict[str, dict[str, float]]:
        return self._report_validation(epoch, self.task.validate(epoch))

    def _report_validation(self, epoch: int, results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        record = {
            "step": self.global_step,
            "epoch": epoch,
            **{f"val/{k}_{name}": v for name, r in results.items() for k, v in r.items() if k != "samples"},
        }
        self.log.log_record(record)
        scores = " ".join(f"{name} {r['top1']:.2f}%" for name, r in results.items())
        images = next(iter(results.values()))["samples"]
        self.log.print(f"epoch {epoch} step {self.global_step}: val top-1 {scores} ({images} images)")
        return results

    def _save_final(self) -> None:
        """What the task leaves behind at the end (a one-network run's ``RUN/final``)."""
        folder = self.task.finish(self.env.is_main)
        if folder is not None:
            self.log.print(f"final model: {folder}")

    def close(self, *, destroy_process_group: bool = True, failed: bool = False) -> None:
        """Flush logs; end the process group unless the caller reuses it (in-process tests).  After a failure
        there is no collective: the other ranks may be anywhere, and this rank must exit at once (its exit
        code is what ``srun --kill-on-bad-exit`` and the launchers act on)."""
        self.log.close()
        self.lock.release()
        if dist.is_initialized() and not failed:
            dist.barrier()
            if destroy_process_group:
                dist.destroy_process_group()
