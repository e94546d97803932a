"""A run's data: its loaders, its length in optimizer steps and the background data check, checked before any
step (a split too small for one step, more classes than the model's outputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data_pipeline import DataError, build_loader
from data_pipeline.integrity import DataWatch, split_files
from data_pipeline.manifest import has_manifest, read_manifest


@dataclass(slots=True)
class RunData:
    train_loader: Any
    val_loader: Any
    calib_loader: Any
    """Training batches for BatchNorm recalibration (their own seeded order)."""
    steps_per_epoch: int
    total_steps: int
    """Optimizer steps of the schedule (``optimizer.epochs``)."""
    warmup_steps: int
    final_step: int
    """Where this run stops (``optimizer.max_steps`` or the schedule's end)."""
    watch: DataWatch
    notes: list[str]
    """Warnings to print when training starts (a model with more outputs than the data has classes)."""


def build_run_data(config, *, rank: int, world: int, local_rank: int) -> RunData:
    data, tc, seed = config.data, config.optimizer, config.seed
    shard = {"rank": rank, "world_size": world}
    train = build_loader(data, data.train_split, train=True, seed=seed, **shard)
    val = build_loader(data, data.val_split, train=False, seed=seed, **shard)
    calib = build_loader(data, data.train_split, train=True, seed=seed + 1, **shard)
    steps_per_epoch = len(train) // tc.gradient_accumulation_steps
    if steps_per_epoch < 1:
        per_step = data.batch_size * world * tc.gradient_accumulation_steps
        raise DataError(
            f"one optimizer step needs {per_step} training images (data.batch_size {data.batch_size} × "
            f"{world} rank(s) × optimizer.gradient_accumulation_steps {tc.gradient_accumulation_steps}); "
            f"split '{data.train_split}' of {data.root} has {train.num_samples}"
        )
    notes = []
    if has_manifest(data.root):
        classes = read_manifest(data.root).get("classes") or []
        if len(classes) > config.model.num_classes:
            raise DataError(
                f"{data.root} has {len(classes)} classes but model.num_classes is "
                f"{config.model.num_classes}: set model.num_classes to at least {len(classes)}"
            )
        if classes and len(classes) < config.model.num_classes:
            notes.append(
                f"warning: {data.root} has {len(classes)} classes but model.num_classes is "
                f"{config.model.num_classes}; the extra outputs are never a label (--set "
                f"model.num_classes={len(classes)} unless that is meant)"
            )
    watch = DataWatch(
        data.root,
        split_files(data.root, [data.train_split, data.val_split], data.format),
        hash_files=data.verify == "background" and local_rank == 0,
    )
    total = tc.epochs * steps_per_epoch
    final = min(total, tc.max_steps) if tc.max_steps else total
    warmup = round(tc.warmup_epochs * steps_per_epoch)
    return RunData(train, val, calib, steps_per_epoch, total, warmup, final, watch, notes)
