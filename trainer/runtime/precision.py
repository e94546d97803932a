"""bf16 autocast of a forward pass: weights, gradients, their accumulation and reduction stay fp32.

Selected by ``engine.precision: bf16_autocast``.  Matrix products and convolutions run in bfloat16 where the CPU
or GPU has the instructions for it; the logits come back as float32, so every loss is computed in
fp32.  On a CPU without AVX-512 BF16 / AMX, PyTorch emulates bf16 and the step is several times
*slower* than fp32 (measured: ``bench/step_throughput.py`` prints both).
"""

from __future__ import annotations

import torch


def forward_logits(engine, inputs: torch.Tensor, *, bf16_autocast: bool) -> torch.Tensor:
    """``engine(inputs)`` under bf16 autocast when asked, as float32 logits."""
    if not bf16_autocast:
        return engine(inputs)
    with torch.autocast(device_type=inputs.device.type, dtype=torch.bfloat16):
        logits = engine(inputs)
    return logits.float()
