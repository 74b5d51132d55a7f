r"""Decoders: networks from latent features (and an optional label) to likelihood parameters.

One module per network, each defining one :class:`~ppl_vae.models.decoders.base.Decoder`
subclass; the module name is the component name (``decoder = "resnet"``). Shipped: ``mlp``
(:class:`MLPDecoder`), ``conv`` (:class:`ConvDecoder`) and ``resnet`` (:class:`ResNetDecoder`);
:mod:`~ppl_vae.models.decoders.base` holds the contract and the shared blocks.

Note:
    ``ppl_vae.models.decoders.mlp`` as an *attribute* of this package is the helper function
    :func:`~ppl_vae.models.decoders.base.mlp` (as it was before decoders became a package);
    the module of :class:`MLPDecoder` is imported with
    ``from ppl_vae.models.decoders.mlp import MLPDecoder`` or :func:`importlib.import_module`.
"""

from . import base
from .base import ACTIVATIONS, CONV_NORMS, NORMS, Decoder, ResidualBlock, check_conv_shape
from .conv import ConvDecoder
from .mlp import MLPDecoder
from .resnet import ResNetDecoder

# Importing the submodule ``.mlp`` bound this package's attribute ``mlp`` to it; the name has
# always meant the helper function, so it is bound back (the submodule stays in sys.modules).
mlp = base.mlp

__all__ = [
    "ACTIVATIONS",
    "CONV_NORMS",
    "NORMS",
    "ConvDecoder",
    "Decoder",
    "MLPDecoder",
    "ResNetDecoder",
    "ResidualBlock",
    "check_conv_shape",
    "mlp",
]
