"""Weight initialisation of the supernet's dynamic layers (``model.init``).

``reference``: what the reference implementation trains with.  It never calls its own init functions, so
every conv and linear layer keeps PyTorch's default (``nn.Conv2d``/``nn.Linear.reset_parameters``:
Kaiming-uniform with a = √5, biases uniform in ±1/√fan_in), computed on the largest shape the supernet
holds.  ``kaiming_fan_out``: Kaiming-normal (fan-out) convolutions, N(0, 0.01) classifier, zero biases.
BatchNorm starts at γ = 1, β = 0 in both; the last γ of every block is zeroed by the supernet when
``model.zero_init_residual_bn`` is set.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import nn

from models.ops import DynamicConv2d, DynamicDepthwiseConv2d, DynamicLinear

InitScheme = Literal["reference", "kaiming_fan_out"]


def _pytorch_default(layer: nn.Module) -> None:
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
    if getattr(layer, "bias", None) is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(layer.weight)
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(layer.bias, -bound, bound)


def _kaiming_fan_out(layer: nn.Module) -> None:
    if isinstance(layer, DynamicLinear):
        nn.init.normal_(layer.weight, std=0.01)
    else:
        nn.init.kaiming_normal_(layer.weight, mode="fan_out")
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)


def init_weights(model: nn.Module, scheme: InitScheme) -> None:
    """Initialise every dynamic conv and linear layer of ``model`` with ``scheme``."""
    init = {"reference": _pytorch_default, "kaiming_fan_out": _kaiming_fan_out}[scheme]
    for module in model.modules():
        if isinstance(module, DynamicConv2d | DynamicDepthwiseConv2d | DynamicLinear):
            init(module)
