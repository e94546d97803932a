"""The Trainer: builds everything in a fixed order, then steps, checkpoints and validates.

Build order: distributed → task (which builds the network) → engine → data → the task's pieces → checkpointer
(+ resume) → logger.  What a step does is the task's (``trainer/tasks/``); no line here names a strategy.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline import EpochSummary
from trainer.config import RunConfig, model_hash, write_resolved
from trainer.run_folder import RunFolderLock, check_config_change, record_config_change
from trainer.runtime import host_allocator
from trainer.runtime.data import build_run_data
from trainer.runtime.distributed import configure_threads, init_distributed, local_world_size, resolve
from trainer.runtime.ds_config import global_batch_size
from trainer.runtime.engine import build_engine
from trainer.runtime.guards import TrainingStopped, bad_data, check_bad_steps
from trainer.runtime.host_allocator import keep_freed_memory
from trainer.runtime.metrics import MetricsLogger
from trainer.runtime.ranks import agree, gathered_objects, mean_over_ranks
from trainer.runtime.requeue import requeue_if_asked
from trainer.runtime.schedule import lr_at
from trainer.runtime.signals import StopSignals
from trainer.runtime.sinks import build_sinks, check_packages
from trainer.runtime.timing import StepTiming
from trainer.state.checkpoint import (
    Checkpointer,
    CheckpointError,
    check_resumable,
    restore_loader,
    rng_state,
    set_rng_state,
)
from trainer.state.reshard import fresh_rng_state
from trainer.tasks import RunContext, build_task
from typedconfig import to_mapping

__all__ = ["Trainer", "TrainingStopped"]


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
        check_packages(config.log)  # a missing optional package stops the run before any work
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
            self.lock.release(discard=True)  # a failed start leaves no lock and no half-made run folder
            raise

    # ------------------------------------------------------------------------------------------ build
    def _build_distributed(self, local_rank_arg: int | None) -> None:
        self.env = resolve(local_rank_arg=local_rank_arg)
        # before the process group starts its threads (trainer/run.py has given them one arena already)
        self.kept_freed_memory = self.config.engine.keep_freed_host_memory and keep_freed_memory()
        self.device = init_distributed(self.env, self.config.engine.dist_timeout_s)
        self.rank, self.world = self.env.rank, self.env.world_size
        if self.env.is_main:  # before any collective: a second run on this folder stops here, at once
            self.lock.acquire()
        self.threads = configure_threads(self.config.engine.threads_per_rank, local_world_size())
        random.seed(self.config.seed + self.rank)
        np.random.seed(self.config.seed + self.rank)

    def _build_model(self) -> None:
        seed = self.config.seed
        torch.manual_seed(seed)  # identical initial weights on every rank ...
        self.task = build_task(self.config, rank=self.rank, world=self.world, device=self.device)
        self.trained = self.task.trained
        if hasattr(self.trained, "channels_last"):  # our networks (a torchvision one keeps its layout)
            self.trained.channels_last = self.config.engine.channels_last
        torch.manual_seed(seed + 1000 * (self.rank + 1))  # ... then per-rank dropout / drop-path draws

    def _build_engine(self) -> None:
        optimizer, micro = self.config.optimizer, self.config.data.batch_size
        self.global_batch = global_batch_size(optimizer, micro_batch=micro, world_size=self.world)
        self.base_lr = optimizer.lr_per_256 * self.global_batch / 256
        shape = {"micro_batch": micro, "world_size": self.world, "lr": self.base_lr}
        built = build_engine(self.trained, self.config.engine, optimizer, **shape)
        self.engine, self.module, self.optimizer = built.engine, built.module, built.optimizer

    def _build_data(self) -> None:
        self.data = build_run_data(self.config, rank=self.rank, world=self.world, local_rank=self.env.local_rank)
        self.train_loader = self.data.train_loader

    def _attach_task(self) -> None:
        self.run_dir = Path(self.config.run_dir)
        self.task.attach(
            RunContext(
                self.config, self.engine, self.module, self.device, self.rank, self.world, self.data, self.run_dir
            )
        )
        self.notes += self.data.notes + self.task.notes
        self.what = self.task.describe() + (" (bf16 autocast)" if self.config.engine.bf16_autocast else "")

    def _build_checkpointer_and_resume(self) -> None:
        folder = self.run_dir / "checkpoints"
        every, keep = self.config.checkpoint.every_steps, self.config.checkpoint.keep
        self.checkpointer = Checkpointer(
            folder, self.rank, self.world, keep=keep, every_steps=every, reshard_refusal=self._reshard_refusal()
        )
        self.model_hash = model_hash(self.config)  # the model's identity and the task's
        self.global_step = self.bad_steps = self.skipped_total = 0
        self.resume_warnings: list[str] = []
        self.resumed_from = self._maybe_resume()

    def _build_logger(self) -> None:
        if self.env.is_main:
            record_config_change(self.run_dir, self.config_changes, self.global_step)
            write_resolved(self.config, self.run_dir)
        steps = {"total_steps": self.data.final_step, "start_step": self.global_step}
        sinks = []
        if self.env.is_main:  # TensorBoard, W&B, MLflow: W&B and MLflow runs start (or continue) here
            run_config = to_mapping(self.config)
            sinks = build_sinks(self.config.log, self.run_dir, run_config=run_config, start_step=self.global_step)
        self.log = MetricsLogger(self.run_dir, enabled=self.env.is_main, sinks=sinks, **steps)
        self.signals = StopSignals()  # USR1, TERM, INT (Ctrl-C) and the like: save at the next step boundary

    def _reshard_refusal(self) -> str | None:
        """Why this run cannot resume a checkpoint written by another number of ranks (None: it can)."""
        engine = self.config.engine
        if engine.zero_stage == 3:
            return (
                "ZeRO-3 partitions the weights themselves and resumes only on the world size that wrote them; "
                "resume on that many ranks (ZeRO 0–2 resume on any world size that keeps the global batch)"
            )
        if engine.bf16:
            return "the bf16 optimizer resumes only on the world size that wrote it (fp32 ZeRO 0–2 resume on any)"
        return None

    # ------------------------------------------------------------------------------------------ state
    def _client_state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "model_hash": self.model_hash,
            "world_size": self.world,
            "global_batch": self.global_batch,
            "micro_batch": self.config.data.batch_size,
            "accumulation": self.config.optimizer.gradient_accumulation_steps,
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
        shape = {
            "micro_batch": self.config.data.batch_size,
            "accumulation": self.config.optimizer.gradient_accumulation_steps,
        }
        check_resumable(resumed, self.checkpointer.dir / tag, model_hash=self.model_hash, world=self.world, **shape)
        self.global_step = int(client["global_step"])
        self.bad_steps, self.skipped_total = int(client["bad_steps"]), int(client["skipped_total"])
        resharded = resumed.saved_world not in (0, self.world)
        loader = rank_state["loader"]
        if resharded:
            try:
                loader = self.train_loader.resharded_state(loader)
            except ValueError as exc:  # one line and exit 2, like the other refusals
                raise CheckpointError(f"checkpoint {tag}: {exc}") from None
        restore_loader(self.train_loader, loader, self.checkpointer.dir / tag, self.rank)
        self.task.load_state(client, rank_state)  # on another world size: old rank (rank mod old world)'s
        if resharded and self.rank >= resumed.saved_world:  # a rank the checkpoint did not have: streams of its own
            fresh_rng_state(self.config.seed, self.rank, self.global_step)
        else:
            set_rng_state(rank_state["rng"])
        if resharded and self.env.is_main:
            self.resume_warnings.append(
                f"resuming {tag} of {resumed.saved_world} rank(s) on {self.world}: weights and optimizer state "
                f"resharded, epoch {self.train_loader.epoch} continues at batch {self.train_loader.position} of "
                f"{len(self.train_loader)} per rank"
            )
        return tag

    def save(self) -> str:
        return self.checkpointer.save(self.engine, self.global_step, self._client_state(), self._rank_state())

    def _stop_for_bad_data(self, problem: str | None) -> None:
        """Every rank raises the same DataError (all ranks are here, so gathering the messages is safe)."""
        raise bad_data(problem, world=self.world, step=self.global_step, checkpointer=self.checkpointer)

    def _check_data_before_commit(self) -> bool:
        """Wait for the background hashes (data.verify: background) and stop if any rank found bad data.  False
        when a stop signal ended the wait on some rank: the data was never checked, so nothing may be committed."""
        if self.data.watch.hashing and self.env.is_main:
            self.log.print("waiting for the data check (sha256 of every data file) before committing a checkpoint")
        finished = self.data.watch.wait(stop=lambda: self.signals.received != 0)
        problem = self.data.watch.problem()
        interrupted, failed = agree(not finished, problem is not None)
        if failed:
            self._stop_for_bad_data(problem)
        return not interrupted

    # ------------------------------------------------------------------------------------------ steps
    def set_lr(self, step: int) -> float:
        schedule, warmup = self.config.optimizer.lr_schedule, self.data.warmup_steps
        lr = lr_at(
            step, base_lr=self.base_lr, total_steps=self.data.total_steps, warmup_steps=warmup, schedule=schedule
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

    def _steps(self) -> Iterator[tuple[list, int, bool]]:
        """(mini-batches of one optimizer step, epoch, whether the step ends the epoch), epoch after epoch."""
        while True:
            epoch = self.train_loader.epoch
            for batches, epoch_end in self.train_loader.groups(self.config.optimizer.gradient_accumulation_steps):
                yield batches, epoch, epoch_end

    def _eval_due(self, epoch: int) -> bool:
        every = self.config.eval.every_epochs
        return bool(every) and (epoch + 1) % every == 0

    def _start_lines(self) -> list[str]:
        changes = [f"config change on resume: {k}: {old!r} -> {new!r}" for k, (old, new) in self.config_changes.items()]
        where = self.checkpointer.dir / (self.resumed_from or "")
        resumed = [f"resumed from {where} at step {self.global_step}"] if self.resumed_from else []
        memory = ", freed host memory kept" if self.kept_freed_memory else ""
        memory += " (one malloc arena)" if self.kept_freed_memory and host_allocator.one_arena else ""
        start = (
            f"training {self.what}: {self.world} rank(s), global batch {self.global_batch}, "
            f"{self.data.steps_per_epoch} steps/epoch, {self.data.final_step} steps, lr {self.base_lr:.4f}, "
            f"{self.threads} thread(s) per rank, {self.config.data.num_workers} data worker(s) per rank{memory}"
        )
        return [*self.resume_warnings, *changes, *self.notes, *resumed, start]

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        """Step → log → (stop: save and return) → validate when due → save when due, until the final step."""
        for line in self._start_lines():
            self.log.print(line)
        results: dict[str, Any] = {"global_step": self.global_step, "skipped_steps": self.skipped_total}
        if self.global_step >= self.data.final_step:  # rerunning a finished run: only validate
            results["val"] = self.validate(self.train_loader.epoch)
            return results
        images_since_log = 0
        timing = StepTiming()
        for batches, epoch, epoch_end in self._steps():
            timing.batches_ready()
            values = self.train_step(batches)
            timing.step_done()
            results.update(global_step=self.global_step, skipped_steps=self.skipped_total)
            last = self.global_step >= self.data.final_step
            images_since_log += sum(len(b) for b in batches) * self.world
            if self.global_step % self.config.log.every_steps == 0 or last:
                values.update(timing.window())
                self.log.log_step(self.global_step, epoch, mean_over_ranks(values), images_since_log)
                images_since_log = 0
            limit = self.config.optimizer.max_consecutive_bad_steps
            check_bad_steps(self.bad_steps, limit, step=self.global_step, checkpointer=self.checkpointer)
            if epoch_end and self.train_loader.last_summary is not None:  # over all ranks: console and records
                merged = EpochSummary.merged(gathered_objects(self.train_loader.last_summary, self.world))
                self.log.print(merged.text())
                self.log.log_record({"step": self.global_step, **merged.record()})
            problem = self.data.watch.problem()
            stop, data_failed = agree(self.signals.requested, problem is not None)
            if data_failed:
                self._stop_for_bad_data(problem)
            if stop:
                saved = self.checkpointer.dir / self.save()
                self.log.print(f"{self.signals.reason}: saved {saved}; rerun the same command to resume")
                requeued = requeue_if_asked(self.env.is_main, self.log.print, self.log.close)
                return {**results, "stopped_by_signal": True, "requeued": requeued, "exit_code": self.signals.exit_code}
            if last or (epoch_end and self._eval_due(epoch)):
                results["val"] = self.validate(epoch)
            if self.checkpointer.should_save(
                self.global_step, last=last, epoch_end=epoch_end, healthy=self.bad_steps == 0
            ):
                if not self._check_data_before_commit():
                    self.log.print(
                        "signal received while waiting for the data check: stopped without committing a checkpoint "
                        "(its data was never checked); rerun the same command to resume from the last one"
                    )
                    requeued = requeue_if_asked(self.env.is_main, self.log.print, self.log.close)
                    return {**results, "stopped_by_signal": True, "requeued": requeued}
                self.save()
            if last:
                if (folder := self.task.finish(self.env.is_main)) is not None:  # e.g. a one-network run's RUN/final
                    self.log.print(f"final model: {folder}")
                self.log.print(
                    f"done: {self.run_dir} holds config.yaml, checkpoints/, metrics.jsonl, console.log; "
                    "rerunning the same command only re-validates"
                )
                return results
            timing.waiting()
        raise AssertionError("unreachable: the step iterator never ends")

    def validate(self, epoch: int) -> dict[str, dict[str, float]]:
        """The task's validation (top-1/top-5 per network), logged.  Runs on a forked torch RNG (an evaluation may
        build copies of networks, which draws initial weights), so validating never changes the training
        stream: a run stopped at ``max_steps`` (validated, then saved) and extended continues bit-identically."""
        with torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else []):
            results = self.task.validate(epoch)
        self.log.log_validation(self.global_step, epoch, results)
        return results

    def close(self, *, destroy_process_group: bool = True, failed: bool = False) -> None:
        """Flush logs; end the process group unless the caller reuses it (in-process tests).  After a failure
        there is no collective: the other ranks may be anywhere, and this rank must exit at once (its exit
        code is what ``srun --kill-on-bad-exit`` and the launchers act on).  A run that failed before its first
        step removes the run folder it made."""
        self.log.close(failed=failed)
        self.lock.release(discard=failed and self.global_step == 0 and self.resumed_from is None)
        self.signals.restore()
        if dist.is_initialized() and not failed:
            dist.barrier()
            if destroy_process_group:
                dist.destroy_process_group()
