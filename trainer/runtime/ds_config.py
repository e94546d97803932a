"""The one place that turns the typed config into a DeepSpeed config dict."""

from __future__ import annotations

from typing import Any

from trainer.sections import EngineConfig, OptimizerConfig


def build_ds_config(
    engine: EngineConfig, optimizer: OptimizerConfig, *, micro_batch: int, world_size: int
) -> dict[str, Any]:
    """DeepSpeed settings for the sandwich step.

    DeepSpeed's own accumulation is set to 1: the N sub-network backward passes of a step (and any
    extra mini-batches) are accumulated by the trainer with ``set_gradient_accumulation_boundary``,
    so gradients are reduced once per optimizer step.  Clipping by value happens in the optimizer, so
    DeepSpeed's norm clipping (default 1.0!) is switched off explicitly.
    """
    global_batch = micro_batch * optimizer.gradient_accumulation_steps * world_size
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": engine.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if engine.zero_stage in (1, 2):
        config["zero_optimization"]["contiguous_gradients"] = engine.contiguous_gradients
    if engine.bf16:
        # bf16 weights and activations, but the N backward passes accumulate and reduce in fp32: DeepSpeed's
        # BF16 optimizer (ZeRO-1) keeps fp32 gradients and fp32 master weights.
        config["bf16"] = {"enabled": True}
        config["data_types"] = {"buffer_dtype": "bf16", "grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    assert (
        config["train_batch_size"]
        == config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * world_size
    )
    assert global_batch == micro_batch * optimizer.gradient_accumulation_steps * world_size
    return config


def global_batch_size(optimizer: OptimizerConfig, *, micro_batch: int, world_size: int) -> int:
    """Images per optimizer step over all ranks (what the LR scaling rule uses)."""
    return micro_batch * optimizer.gradient_accumulation_steps * world_size
