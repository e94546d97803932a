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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline import DataError, EpochSummary, build_loader
from data_pipeline.device_transforms import normalize, rescale
from data_pipeline.integrity import DataWatch, split_files
from data_pipeline.manifest import has_manifest, read_manifest
from losses import build_kd_loss, build_label_loss
from models import ArchSampler, build_supernet
from trainer import host_allocator
from trainer.attentive import AttentiveSampler, attentive_middle
from trainer.checkpoint import Checkpointer, rng_state, set_rng_state
from trainer.collectives import all_reduce_
from trainer.config import RunConfig, config_hash, model_hash, write_resolved
from trainer.distributed import configure_threads, init_distributed, local_world_size, resolve
from trainer.ds_config import global_batch_size
from trainer.engine import build_engine, one_reduction
from trainer.evaluate import accuracy_counts, collect_calibration, evaluate_arch, gathered, percentages
from trainer.host_allocator import keep_freed_memory
from trainer.local_sharing import LocalSharing
from trainer.metrics import MetricsLogger
from trainer.networks import FINAL_DIR, build_student_and_teacher, save_network
from trainer.run_folder import RunFolderLock, check_config_change, record_config_change
from trainer.sandwich import SandwichStep, sample_sandwich
from trainer.schedule import lr_at
from trainer.standalone import StandaloneStep, teacher_logit_cache
from trainer.voted import SnapshotVote
from typedconfig import to_mapping


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

    def __init__(self, config: RunConfig, *, local_rank_arg: int | None = None, allow_config_change: bool = False):
        self.config = config
        self.config_changes = check_config_change(config, Path(config.run_dir), allow=allow_config_change)
        self.lock = RunFolderLock(Path(config.run_dir))
        try:
            self._build_distributed(local_rank_arg)
            self._build_model()
            self._build_engine()
            self._build_data()
            self._build_teacher_cache()
            self._build_voter()
            self._build_local_sharing()
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
        seed, loss, standalone = self.config.seed, self.config.loss, self.config.standalone
        torch.manual_seed(seed)  # identical initial weights on every rank ...
        self.space = self.sampler = self.attentive = self.voter = self.local = self.student = self.teacher = None
        self.notes: list[str] = []  # printed when training starts (teacher cache, snapshot memory)
        if standalone is None:
            self.trained = build_supernet(self.config.model)
            self.space = self.trained.space
            self.sampler = ArchSampler(self.space, seed)
            self.sandwich = SandwichStep(
                build_label_loss(loss),
                build_kd_loss(loss),
                loss.kd_weight,
                bf16_autocast=self.config.trainer.bf16_autocast,
            )
            self.what = f"{self.space.name} supernet"
            tc = self.config.trainer
            self.trained.activation_checkpointing = tc.activation_checkpointing  # a runtime switch, not in the hash
            if tc.activation_checkpointing:
                self.what += " (activation checkpointing)"
            if tc.teacher != "inplace":
                self.what += (
                    f" ({tc.teacher} teacher: {tc.voted.snapshots} snapshot(s) every {tc.voted.every_steps} steps)"
                )
            if tc.sampler == "attentive":
                self.attentive = AttentiveSampler(self.space, self.sampler, tc.attentive, self.config.model.num_classes)
                self.what += f" ({tc.attentive.choice} of {tc.attentive.candidates} attentive sampling)"
        else:
            self.student, self.teacher = build_student_and_teacher(
                self.config, rank=self.rank, world=self.world, device=self.device
            )
            self.trained = self.student.module
            kd = build_kd_loss(loss) if self.teacher is not None else None
            self.single_step = StandaloneStep(
                build_label_loss(loss),
                kd,
                kd_weight=loss.kd_weight,
                label_weight=standalone.label_weight,
                bf16_autocast=self.config.trainer.bf16_autocast,
            )
            self.what = f"standalone {self.student.description}" + (
                f" distilled from {self.teacher.network.description}" if self.teacher else ""
            )
        if hasattr(self.trained, "channels_last"):  # our networks (a torchvision student keeps its layout)
            self.trained.channels_last = self.config.trainer.channels_last
        if self.config.trainer.bf16_autocast:
            self.what += " (bf16 autocast)"
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

    def _build_teacher_cache(self) -> None:
        """``standalone.teacher_logits: cached``: the teacher's logits on every training image, computed once."""
        standalone, data = self.config.standalone, self.config.data
        if self.teacher is None or standalone.teacher_logits != "cached":
            return
        eval_loader = build_loader(
            data, data.train_split, train=False, seed=self.config.seed, rank=self.rank, world_size=self.world
        )
        key = config_hash({"teacher": to_mapping(standalone.teacher), "data": to_mapping(data)})
        self.teacher.cache, missing = teacher_logit_cache(
            self.teacher,
            eval_loader,
            self.train_loader.num_samples,
            Path(self.config.run_dir),
            key=key,
            mean=data.mean,
            std=data.std,
            device=self.device,
            rank=self.rank,
            world=self.world,
        )
        self.notes.append(f"teacher logits cached for {self.train_loader.num_samples - missing} training images")

    def _build_voter(self) -> None:
        """``trainer.teacher: voted | inplace_and_voted``: the snapshot queue, wired into the sandwich step."""
        tc, model = self.config.trainer, self.config.model
        if self.sampler is None or tc.teacher == "inplace":
            return
        device = self.device
        self.voter = SnapshotVote(
            lambda: build_supernet(model).to(device),
            tc.voted,
            warmup_steps=round(tc.voted.warmup_epochs * self.steps_per_epoch),
        )
        self.sandwich.voter = self.voter
        self.sandwich.vote_loss = build_kd_loss(replace(self.config.loss, kd_loss=tc.voted.kd_loss))
        self.sandwich.vote_weight = tc.voted.weight
        self.sandwich.inplace = tc.teacher == "inplace_and_voted"
        mib = sum(t.numel() * 4 for t in self.module.state_dict().values()) / 2**20
        self.notes.append(
            f"voted teacher: up to {tc.voted.snapshots} fp32 snapshot(s) of {mib:.1f} MiB each per rank, "
            f"one every {tc.voted.every_steps} steps from step {self.voter.warmup_steps}"
        )

    def _build_local_sharing(self) -> None:
        """``model.sharing: local``: Algorithm 1's schedule, meta-networks and assignments around the sandwich."""
        model = self.config.model
        if self.sampler is None or model.sharing != "local":
            return
        self.local = LocalSharing(
            self.module,
            model.local,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            label_loss=self.sandwich.label_loss,
            rank=self.rank,
            world=self.world,
        )
        self.notes.append(self.local.describe())

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
        self.model_hash = model_hash(self.config)  # with the student and teacher of a standalone run
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
            "sampler": self.sampler.state_dict() if self.sampler else {},
            "bad_steps": self.bad_steps,
            "skipped_total": self.skipped_total,
            **({"search_space": self.space.to_dict()} if self.space else {}),
            **({"local_sharing": self.local.assignment.to_dict()} if self.local else {}),
        }

    def _rank_state(self) -> dict[str, Any]:
        state = {"loader": self.train_loader.state_dict(), "rng": rng_state()}
        if self.voter is not None:
            state["voted"] = self.voter.state_dict()
        if self.local is not None:
            state["local_sharing"] = self.local.state_dict()
        return state

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
        if self.sampler is not None:
            self.sampler.load_state_dict(client["sampler"])
        self.bad_steps, self.skipped_total = int(client["bad_steps"]), int(client["skipped_total"])
        self.train_loader.load_state_dict(rank_state["loader"])
        if self.voter is not None:
            self.voter.load_state_dict(rank_state.get("voted", {"steps": [], "weights": []}))
        if self.local is not None:
            self.local.load_state_dict(rank_state["local_sharing"], client["local_sharing"])
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
        """One optimizer step over ``gradient_accumulation_steps`` mini-batches, N sub-networks each."""
        lr = self.set_lr(self.global_step)
        data = self.config.data
        if self.sampler is not None:
            n, middle = self.config.trainer.num_subnets, None
            if self.attentive is not None:  # scored on the step's first mini-batch
                first = batches[0].to(self.device)
                images = normalize(first.images, data.mean, data.std)
                middle = attentive_middle(
                    self.attentive, n - 2, lambda arch: self._proxy_loss(arch, images, first.labels)
                )
            subnets = sample_sandwich(self.space, self.sampler, n, middle)
        self.engine.train()
        sums: dict[str, torch.Tensor] = {}
        if self.local is not None:  # candidates, pair and meta-network step from the step's first mini-batch
            first = batches[0].to(self.device)
            first_images = normalize(first.images, data.mean, data.std)
            subnets, sums = self.local.prepare(self.global_step, subnets, first_images, first.labels, lr)
        with one_reduction(self.engine, self.config.trainer):  # ZeRO-2/3: the step's gradients reduced once
            for i, batch in enumerate(batches):
                batch = batch.to(self.device)
                images = normalize(batch.images, data.mean, data.std)
                last_micro_batch = i == len(batches) - 1
                if self.student is not None:
                    teacher_logits = self.teacher(images, batch.indices) if self.teacher else None
                    values = self.single_step(
                        self.engine,
                        self.student.resolution,
                        images,
                        batch.labels,
                        teacher_logits,
                        last_micro_batch=last_micro_batch,
                    )
                else:
                    values = self.sandwich(
                        self.engine, self.module, subnets, images, batch.labels, last_micro_batch=last_micro_batch
                    )
                for key, value in values.items():
                    sums[key] = sums.get(key, 0) + value / len(batches)
        self.engine.step()
        skipped = self.optimizer.last_step_skipped
        self.global_step += 1
        if self.voter is not None and self.voter.maybe_snapshot(self.global_step, self.module):
            sums["voted/snapshots"] = torch.tensor(float(len(self.voter.models)))
        if self.local is not None:
            fixed = self.local.after_step(self.global_step, first_images, first.labels)
            sums.update({k: torch.tensor(v) for k, v in fixed.items()})
            if fixed:
                self.log.print(
                    f"local sharing: layer {int(fixed['local/layer_decided'])} fixed at step {self.global_step}, "
                    f"{fixed['local/candidate0_share']:.0%} of its sampled archs on candidate 0"
                )
        self.skipped_total += int(skipped)
        self.bad_steps = self.bad_steps + 1 if skipped else 0
        return {"lr": lr, "skipped": float(skipped), **sums}

    @torch.no_grad()
    def _proxy_loss(self, arch, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Attentive sampling's score of ``arch``: its label loss on the mini-batch, no gradient, no dropout."""
        self.module.set_arch(arch, regularize=False)
        dtype = next(self.module.parameters()).dtype
        return self.sandwich.label_loss(self.engine(rescale(images, arch.resolution).to(dtype)), labels)

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
        tc, data = self.config.trainer, self.config.data
        if self.student is not None:
            return self._validate_student(epoch)
        self.calib_loader.set_epoch(epoch)
        calib = collect_calibration(self.calib_loader, tc.calib_batches, self.device, data.mean, data.std)
        results = {}
        for name, arch in (("largest", self.space.largest()), ("smallest", self.space.smallest())):
            self.val_loader.set_epoch(0)
            results[name] = evaluate_arch(
                self.module,
                arch,
                calib,
                self.val_loader,
                zero_stage=tc.zero_stage,
                mean=data.mean,
                std=data.std,
                device=self.device,
            )
        return self._report_validation(epoch, results)

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

    def _validate_student(self, epoch: int) -> dict[str, dict[str, float]]:
        """Top-1/top-5 of the student as it is (no BN recalibration: its statistics were tracked in training),
        with rank 0's BatchNorm statistics on every rank: what the checkpoint and the final export hold."""
        tc, data = self.config.trainer, self.config.data
        with gathered(self.module, tc.zero_stage):
            if dist.is_initialized() and self.world > 1:
                for buffer in self.module.buffers():
                    dist.broadcast(buffer, src=0)
            self.val_loader.set_epoch(0)
            counts = accuracy_counts(
                self.module, self.val_loader, self.student.resolution, data.mean, data.std, self.device
            )
        self.module.train()
        return self._report_validation(epoch, {"student": percentages(counts)})

    def _save_final(self) -> None:
        """A standalone run ends by writing its student to ``RUN/final`` (an ``export:`` source)."""
        if self.student is None:
            return
        with gathered(self.module, self.config.trainer.zero_stage):
            if self.env.is_main:
                folder = save_network(self.student, self.run_dir / FINAL_DIR)
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
