"""The trainer section of a run config."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.schedule import LRSchedule


@dataclass(kw_only=True, slots=True)
class TrainerConfig:
    """Optimisation, the sandwich rule, DeepSpeed, checkpoints and logging."""

    epochs: int = 360
    """Passes over the training split."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (the schedule still spans ``epochs``); for smoke runs."""
    lr_per_256: float = 0.1
    """Learning rate per 256 images of global batch (linear scaling rule)."""
    warmup_epochs: float = 5.0
    """Linear warmup from 0.001× to the full rate over this many epochs, stepped per iteration."""
    lr_schedule: LRSchedule = "warmup_times_cosine"
    """``warmup_times_cosine``: the reference's rule, one cosine over all iterations multiplied by the warmup
    factor; ``warmup_then_cosine``: warmup, then a cosine over the remaining iterations. Both end at 0."""
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-5
    """On conv/linear weights only (not BatchNorm parameters, not biases)."""
    grad_clip_value: float | None = 1.0
    """Element-wise gradient clipping (the paper's recipe); null disables it."""
    num_subnets: int = 4
    """N of the sandwich rule: largest + (N−2) random + smallest, one optimizer step."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0–3."""
    bf16: bool = False
    """bfloat16 mixed precision (GPUs with bf16 support)."""
    gradient_accumulation_steps: int = 1
    """Mini-batches per optimizer step (each runs the full sandwich)."""
    checkpoint_every_steps: int = 1000
    """Save a sharded checkpoint every N steps (and at every epoch end)."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept; older ones are deleted after a new one is committed."""
    max_consecutive_bad_steps: int = 5
    """Stop after this many skipped steps in a row (non-finite loss or gradient)."""
    log_every_steps: int = 10
    """Steps between JSONL/TensorBoard records and console refreshes."""
    eval_every_epochs: int = 1
    """Validate the largest and smallest sub-networks every N epochs (0: only at the end)."""
    calib_batches: int = 16
    """Training batches used to recalibrate BatchNorm statistics before each evaluation."""
    tensorboard: bool = True

    def __post_init__(self) -> None:
        positive = (
            "epochs",
            "num_subnets",
            "gradient_accumulation_steps",
            "checkpoint_every_steps",
            "keep_checkpoints",
            "max_consecutive_bad_steps",
            "log_every_steps",
            "calib_batches",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_subnets < 2:
            raise ValueError(f"trainer.num_subnets must be >= 2 (largest and smallest), got {self.num_subnets}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"trainer.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.lr_per_256 <= 0 or self.warmup_epochs < 0 or self.weight_decay < 0:
            raise ValueError("trainer.lr_per_256 must be > 0, warmup_epochs and weight_decay >= 0")
        if self.grad_clip_value is not None and self.grad_clip_value <= 0:
            raise ValueError(f"trainer.grad_clip_value must be positive or null, got {self.grad_clip_value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"trainer.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.eval_every_epochs < 0:
            raise ValueError(f"trainer.eval_every_epochs must be >= 0, got {self.eval_every_epochs}")
