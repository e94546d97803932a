"""Tell DeepSpeed up front that a machine without an accelerator trains on the CPU.

Left to itself, DeepSpeed probes for an accelerator when first asked and, finding none, prints a warning in every
process that it falls back to the CPU ("If you have GPU or other accelerator, we were unable to detect it").  On a
laptop or a CPU node that line is noise repeated once per rank.  When torch sees no CUDA (or Apple) device and no
other accelerator's PyTorch extension is installed, the answer is known before DeepSpeed asks.
"""

from __future__ import annotations

import os
from importlib.util import find_spec

OTHER_ACCELERATORS = ("intel_extension_for_pytorch", "torch_npu", "habana_frameworks", "torch_mlu", "torch_sdaa")
"""PyTorch extensions through which DeepSpeed finds a non-CUDA accelerator (XPU, Ascend, Gaudi, MLU, SDAA)."""


def default_to_cpu() -> bool:
    """Set ``DS_ACCELERATOR=cpu`` when nothing else can be meant (the user's own setting is kept); True if set."""
    if os.environ.get("DS_ACCELERATOR"):
        return False
    if any(find_spec(name) is not None for name in OTHER_ACCELERATORS):
        return False
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return False
    os.environ["DS_ACCELERATOR"] = "cpu"
    return True
