"""The run config's sections by concern: the optimiser and its schedule, the engine, checkpoints, evaluation and
logging (before 0.2 all of them were keys of one ``trainer:`` section; ``trainer/config_keys.py`` reads those)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from typedconfig import Range, check_ranges

LRSchedule = Literal["warmup_times_cosine", "warmup_then_cosine"]
Precision = Literal["fp32", "bf16", "bf16_autocast"]


@dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    """``optimizer``: SGD, its learning-rate schedule and the run's length."""

    epochs: Annotated[int, Range(ge=1)] = 360
    """Passes over the training split."""
    max_steps: Annotated[int | None, Range(ge=1)] = None
    """Stop after this many optimizer steps (the schedule still spans ``epochs``); for smoke runs."""
    lr_per_256: Annotated[float, Range(gt=0)] = 0.1
    """Learning rate per 256 images of global batch (linear scaling rule)."""
    warmup_epochs: Annotated[float, Range(ge=0)] = 5.0
    """Linear warmup from 0.001× to the full rate over this many epochs, stepped per iteration."""
    lr_schedule: LRSchedule = "warmup_times_cosine"
    """``warmup_times_cosine``: the reference's rule, one cosine over all iterations multiplied by the warmup
    factor; ``warmup_then_cosine``: warmup, then a cosine over the remaining iterations. Both end at 0."""
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9
    nesterov: bool = True
    weight_decay: Annotated[float, Range(ge=0)] = 1e-5
    """On conv/linear weights only (not BatchNorm parameters, not biases)."""
    grad_clip_value: Annotated[float | None, Range(gt=0)] = 1.0
    """Element-wise gradient clipping (the paper's recipe); null disables it."""
    gradient_accumulation_steps: Annotated[int, Range(ge=1)] = 1
    """Mini-batches per optimizer step (each runs the full sandwich)."""
    max_consecutive_bad_steps: Annotated[int, Range(ge=1)] = 5
    """Stop after this many skipped steps in a row (non-finite loss or gradient)."""

    def __post_init__(self) -> None:
        check_ranges(self, "optimizer")


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    """``engine``: DeepSpeed (ZeRO stage and its options), precision, layout, threads and memory of each rank."""

    zero_stage: Annotated[int, Range(ge=0, le=3)] = 0
    """DeepSpeed ZeRO stage 0–3."""
    contiguous_gradients: bool = False
    """ZeRO-1/2: DeepSpeed's ``contiguous_gradients``, copying each gradient into a reduction buffer as the
    backward pass produces it (against memory fragmentation on large models).  Off by default: under ZeRO-1
    it also installs a hook on every parameter that runs in each of a step's N backward passes, and the
    copies repeat in each of them under ZeRO-2; off, ZeRO-1 accumulates in ``.grad`` as the plain loop does.
    With it off and ``coalesce_grad_reduction`` on, ``bench/step_throughput.py --paired`` measured ZeRO-1 at
    0.97× the plain loop against 0.93× with DeepSpeed's defaults, ZeRO-2 at 0.95× against 0.82× (2 CPU ranks,
    full AlphaNet space); ZeRO-3 showed no change and keeps DeepSpeed's default."""
    coalesce_grad_reduction: bool = True
    """ZeRO-2/3: reduce the gradients of a step's backward passes (N sub-networks × the mini-batches) once, at
    the step's end (DeepSpeed's ``coalesce_grad_reduction``), instead of reduce-scattering them after every
    backward pass.  The price is ZeRO-2/3's saving on gradient memory: until the step's end each rank holds
    every gradient, as ZeRO-0/1 do (96 MB for the AlphaNet supernet in fp32).  With ``contiguous_gradients``
    off, ``bench/step_throughput.py --paired`` measured ZeRO-2 at 0.95× the plain loop against 0.82× with
    DeepSpeed's defaults, ZeRO-3 at 0.54× against 0.52× (2 CPU ranks, full AlphaNet space).  Turn it off for a
    model whose gradients do not fit beside its activations."""
    zero3_gather: Literal["network", "block"] = "network"
    """ZeRO-3: what DeepSpeed gathers parameters for, in one go.  ``network``: the whole network, once per
    forward pass and once per backward pass, released after each (the network is DeepSpeed's one leaf module;
    ``trainer.runtime.engine.mark_zero3_leaves``).  ``block``: each block of the network, gathered before it runs and
    released after, so that only one block's parameters are whole at a time, for a network whose parameters do
    not fit on one device (the AlphaNet supernet's are 96 MB in fp32).  Same updates either way (tested).
    ``bench/step_throughput.py --paired`` measured ZeRO-3 at 0.86× the plain loop with ``network`` against 0.64×
    with ``block`` (2 CPU ranks, full AlphaNet space, AVX2): a supernet runs a different sub-network in every
    forward pass, so DeepSpeed never completes its trace of the module order and releases every block's
    parameters after the block, whatever its persistence threshold; per block, its hooks cost more than the
    gathers."""
    precision: Precision = "fp32"
    """``fp32``; ``bf16``: bfloat16 weights and activations with fp32 master weights and fp32 gradient accumulation
    and reduction (DeepSpeed's BF16 optimizer, ZeRO stage 1 only); ``bf16_autocast``: forward passes under bfloat16
    autocast with fp32 weights, fp32 losses and fp32 gradients (accumulated and reduced in fp32; any ZeRO stage),
    faster only where the hardware has bf16 instructions (AVX-512 BF16 or AMX on CPUs, Ampere and later GPUs; on a
    CPU without them several times slower than fp32, ``trainer.runtime.precision``)."""
    channels_last: bool = True
    """Run the network's convolutions on channels-last (NHWC) tensors: 1.5–1.8× faster forward + backward than
    NCHW on a CPU (measured; ``bench/step_throughput.py``).  Same numbers up to float rounding; on GPUs the
    better layout depends on the kernels, so it can be turned off."""
    activation_checkpointing: bool = False
    """Recompute each MBConv block's activations in the backward pass instead of storing them: saves memory,
    costs about one extra forward. BatchNorm running statistics are updated once and drop-path masks are the
    same in the recompute, so training is unchanged."""
    threads_per_rank: Annotated[int | None, Range(ge=1)] = None
    """torch threads of each rank; null: the cores the process may use ÷ the ranks on its node."""
    keep_freed_host_memory: bool = True
    """Each rank's ``malloc`` keeps freed memory for the next step instead of returning it to the kernel
    (``trainer.runtime.host_allocator``, glibc only): 3–14 % faster steps on 2 CPU ranks at full size, 0–5 % more
    peak resident memory.  Off: glibc's defaults, except that ``trainer/run.py`` has given the
    rank's threads one arena before it read the config."""
    dist_timeout_s: Annotated[float, Range(gt=0)] = 900.0
    """Seconds a collective (all-reduce, barrier) may wait for the other ranks before the process group
    gives up; covers the longest rank-0-only pause (a checkpoint write, a validation)."""

    @property
    def bf16(self) -> bool:
        """bf16 weights (DeepSpeed's BF16 optimizer)."""
        return self.precision == "bf16"

    @property
    def bf16_autocast(self) -> bool:
        """fp32 weights, bf16 forward passes."""
        return self.precision == "bf16_autocast"

    def __post_init__(self) -> None:
        check_ranges(self, "engine")
        if self.bf16 and self.zero_stage != 1:
            raise ValueError(
                f"engine.precision bf16 needs engine.zero_stage 1 (got {self.zero_stage}): that is where DeepSpeed "
                "accumulates and reduces bf16 gradients in fp32 (its BF16 optimizer); use fp32 or bf16_autocast for "
                "other stages"
            )


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """``checkpoint``: when sharded checkpoints are written and how many are kept."""

    every_steps: Annotated[int, Range(ge=1)] = 1000
    """Save a sharded checkpoint every N steps (and at every epoch end)."""
    keep: Annotated[int, Range(ge=1)] = 3
    """Newest checkpoints kept; older ones are deleted after a new one is committed."""

    def __post_init__(self) -> None:
        check_ranges(self, "checkpoint")


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """``eval``: validation during training."""

    every_epochs: Annotated[int, Range(ge=0)] = 1
    """Validate the largest and smallest sub-networks every N epochs (0: only at the end)."""
    calib_batches: Annotated[int, Range(ge=1)] = 16
    """Training batches used to recalibrate BatchNorm statistics before each evaluation."""

    def __post_init__(self) -> None:
        check_ranges(self, "eval")


@dataclass(kw_only=True, slots=True)
class WandbConfig:
    """``log.wandb``: the records also go to a Weights & Biases run (``pip install 'alphanet-train[wandb]'``)."""

    enabled: bool = False
    """Log to W&B from rank 0: every record of ``metrics.jsonl``, the resolved config as the run's config.  The
    run's id is kept in ``RUN/wandb_run_id``, so a resumed training continues the same W&B run."""
    project: str = "alphanet-train"
    """W&B project of the run."""
    entity: str | None = None
    """W&B user or team; null: the account's default entity."""
    name: str | None = None
    """Display name of the run; null: the run folder's name."""
    mode: Literal["online", "offline"] | None = None
    """``online``: stream to the W&B server; ``offline``: write only under ``RUN/wandb/`` (upload later with
    ``wandb sync``), for nodes without internet; null: W&B's own choice (the ``WANDB_MODE`` variable, else
    online)."""


@dataclass(kw_only=True, slots=True)
class MlflowConfig:
    """``log.mlflow``: the records also go to an MLflow run (``pip install 'alphanet-train[mlflow]'``)."""

    enabled: bool = False
    """Log to MLflow from rank 0: every record of ``metrics.jsonl`` as metrics at their step, the resolved config
    as the run's parameters (``section.key``).  The run's id is kept in ``RUN/mlflow_run_id``, so a resumed
    training continues the same MLflow run."""
    tracking_uri: str | None = None
    """Where MLflow keeps runs: a server (``http://host:5000``), a database (``sqlite:///path/mlflow.db``); null:
    an SQLite file in the run folder, ``RUN/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db``
    shows it)."""
    experiment: str = "alphanet-train"
    """MLflow experiment of the run (created when missing)."""
    run_name: str | None = None
    """Name of the run; null: the run folder's name."""


@dataclass(kw_only=True, slots=True)
class LogConfig:
    """``log``: console, ``metrics.jsonl`` and TensorBoard records, optionally W&B and MLflow too."""

    every_steps: Annotated[int, Range(ge=1)] = 10
    """Steps between JSONL/TensorBoard records and console refreshes."""
    tensorboard: bool = True
    """Also write the records as TensorBoard events under ``RUN/tensorboard/``."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        check_ranges(self, "log")
