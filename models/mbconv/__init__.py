"""The MBConv family (AlphaNet / AttentiveNAS): ``search_space`` (the space and its archs), ``subnet_plan`` (an
arch resolved into per-block shapes), ``supernet``, ``static`` (standalone sub-networks and their extraction),
``cost``, ``local_sharing`` (the model side of DC-NAS's local weight sharing) and ``family`` (the
:class:`~models.families.Family` registered as ``mbconv``)."""

from models.mbconv.family import MBConvFamily

__all__ = ["MBConvFamily"]
