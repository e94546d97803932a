"""Universally slimmable MobileNetV1 / MobileNetV2 (AlphaNet §4.1, Tables 1–2): width is the only dimension.

A :class:`~models.slimmable.space.SlimmableSpace` (YAML with a ``family`` key, e.g. ``configs/search_spaces/slimmable_mbv2.yaml``)
holds the published layer table and a range of width multipliers on a grid (``width_step``).  A sub-network
is a ``WidthArch`` (one multiplier, one resolution): every layer's channels are ``make_divisible(c × w,
8)`` as the published models round them, and it runs the leading slice of the widest network's weights.

``mobilenet_v2`` follows torchvision's ``mobilenet_v2(width_mult=w)`` exactly (ReLU6, inverted residuals
with ``round(in × t)`` hidden channels, a 1×1 last conv of ``make_divisible(1280 × max(1, w))``); so its
FLOPs and parameters equal torchvision's for every w.  ``mobilenet_v1`` is the depthwise-separable network
of Howard et al. 2017 (ReLU after every BN, no residuals, average pool, classifier).

The standalone model of a sub-network is the same module built for that one width
(:meth:`~models.slimmable.supernet.SlimmableSupernet.extract`): every slice is then the whole tensor, nothing of
the supernet remains.

Modules: ``space`` (:class:`~models.slimmable.space.SlimmableSpace`, ``WidthArch``), ``plan`` (the channels of
one width), ``supernet``, ``cost`` and ``family`` (the :class:`~models.families.Family` registered as
``slimmable``).
"""

from models.slimmable.family import SlimmableFamily

__all__ = ["SlimmableFamily"]
