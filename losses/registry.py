"""The KD losses that configs name (``loss.kd_loss``, ``trainer.voted.kd_loss``).

A loss is a :class:`losses.divergences.KDLoss` subclass registered where it is defined, under the name configs
use, with a ``from_config(LossConfig)`` that takes its parameters from the ``loss:`` section::

    @KD_LOSSES.register("kl")
    class KLDivergence(KDLoss): ...

The registry imports every module of ``losses`` the first time a name is looked up, so a new loss is one
registered class in a new module of the package and nothing else.
"""

from __future__ import annotations

from typedconfig import Registry

KD_LOSSES = Registry("KD loss", package="losses")
"""Name → KD loss class."""

NO_KD = "none"
"""``loss.kd_loss: none``: no distillation (every sub-network trains on the labels); not a registered loss."""


def kd_loss_names() -> list[str]:
    """The registered KD loss names, sorted (without ``none``)."""
    return KD_LOSSES.names()


def check_kd_loss(name: str, key: str, *, none_allowed: bool = False) -> None:
    """A ValueError naming ``key`` unless ``name`` is a registered KD loss (or ``none``, where allowed)."""
    if name in KD_LOSSES or (none_allowed and name == NO_KD):
        return
    alternative = f" (or {NO_KD}: no distillation)" if none_allowed else ""
    raise ValueError(f"{key}: unknown KD loss {name!r}; registered: {', '.join(kd_loss_names())}{alternative}")
