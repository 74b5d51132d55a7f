r"""Encoders: amortised :math:`q(z \mid x)` (or :math:`q(z \mid x, y)`) whose ``forward`` returns it.

One module per network, each defining one :class:`~ppl_vae.guides.encoders.base.Encoder`
subclass; the module name is the component name (``encoder = "resnet"``). Shipped: ``mlp``
(:class:`MLPEncoder`), ``conv`` (:class:`ConvEncoder`) and ``resnet`` (:class:`ResNetEncoder`).
"""

from .base import Encoder
from .conv import ConvEncoder
from .mlp import MLPEncoder
from .resnet import ResNetEncoder

__all__ = ["ConvEncoder", "Encoder", "MLPEncoder", "ResNetEncoder"]
