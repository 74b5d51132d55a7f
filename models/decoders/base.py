r"""The decoder contract and the building blocks shared by decoders and encoders.

A decoder maps ``h`` of shape ``(*batch, in_dim)`` (the prior's :meth:`embed` of z) to a tensor
of shape ``(*batch, P, *data_shape)``, P being the likelihood's ``params_per_element``. Any
number of leading batch dimensions is allowed (vectorised particles add one).

The blocks here (:func:`mlp`, :func:`mlp_trunk`, :func:`activation_block`, :func:`conv_block`,
:class:`ResidualBlock`) take the same three options everywhere: ``activation`` (a name in
:data:`ACTIVATIONS`), ``dropout`` (a probability in [0, 1)) and ``norm`` (``"none"``,
``"batch"``, ``"layer"``, and for convolutions also ``"group"``). With the defaults
(``"relu"``, 0, ``"none"``) a hidden layer is ``Linear -> ReLU`` and nothing else, so networks
built with defaults have the same modules and parameter names as before the options existed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError

#: Activation names and the modules they build (one new instance per layer).
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}
#: Normalisations of fully connected layers.
NORMS = ("none", "batch", "layer")
#: Normalisations of convolutional layers (``"layer"`` normalises over channels and pixels).
CONV_NORMS = ("none", "batch", "group", "layer")
#: Largest number of groups of :class:`torch.nn.GroupNorm` (fewer when the channels demand it).
GROUPS = 8


def make_activation(name: str) -> nn.Module:
    """A new activation module for ``name`` (one of :data:`ACTIVATIONS`)."""
    check_activation(name)
    return ACTIVATIONS[name]()


def check_activation(name: str) -> None:
    """Reject an activation name that is not in :data:`ACTIVATIONS`, listing the choices."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ConfigError(f"Unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")


def check_options(
    activation: str, dropout: float, norm: str, norms: Sequence[str] = NORMS
) -> tuple[str, float, str]:
    """Validate the shared network options; return them as ``(activation, dropout, norm)``."""
    check_activation(activation)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError(f"`dropout` must be a number in [0, 1), got {dropout!r}")
    if not isinstance(norm, str) or norm not in norms:
        raise ConfigError(f"Unknown norm {norm!r}; expected one of {list(norms)}")
    return activation, float(dropout), norm


def check_positive_ints(
    name: str, values: Sequence[int], length: int | None = None
) -> tuple[int, ...]:
    """``values`` as a tuple of positive ints (of ``length`` entries, if given), else ConfigError."""
    ok = isinstance(values, Sequence) and not isinstance(values, str)
    ok = ok and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in values
    )
    if not ok or (length is not None and len(values) != length):
        what = f"{length} positive integers" if length is not None else "positive integers"
        shown = (
            list(values) if isinstance(values, Sequence) and not isinstance(values, str) else values
        )
        raise ConfigError(f"`{name}` must be {what}, got {shown!r}")
    return tuple(int(v) for v in values)


def check_positive_int(name: str, value: int) -> int:
    """``value`` as a positive int, else ConfigError naming ``name``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"`{name}` must be a positive integer, got {value!r}")
    return int(value)


class FlatBatchNorm1d(nn.BatchNorm1d):
    r"""Batch normalisation of the last dimension of ``(*batch, D)`` inputs.

    :class:`torch.nn.BatchNorm1d` reads ``(N, D)``; here all leading dimensions (particles and
    data points alike) are flattened into N, so ``(K, N, D)`` inputs are normalised per feature.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def norm_1d(norm: str, width: int) -> nn.Module | None:
    """The normalisation of a fully connected layer of ``width`` outputs (None for ``"none"``)."""
    check_options("relu", 0.0, norm, NORMS)
    if norm == "batch":
        return FlatBatchNorm1d(width)
    if norm == "layer":
        return nn.LayerNorm(width)
    return None


def fc_norm(norm: str) -> str:
    """The fully connected counterpart of a convolutional ``norm`` (group and layer: layer)."""
    return "layer" if norm == "group" else norm


def norm_2d(norm: str, channels: int) -> nn.Module | None:
    """The normalisation of a convolution with ``channels`` outputs (None for ``"none"``).

    ``"group"`` is :class:`torch.nn.GroupNorm` with ``gcd(channels, 8)`` groups, ``"layer"`` is
    GroupNorm with one group (channels and pixels together). Neither depends on the other
    points of the batch.
    """
    check_options("relu", 0.0, norm, CONV_NORMS)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(channels, GROUPS), channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    return None


def activation_block(
    width: int, *, activation: str = "relu", dropout: float = 0.0, norm: str = "none"
) -> list[nn.Module]:
    """What follows a hidden ``Linear`` of ``width`` outputs: ``[norm], activation, [dropout]``."""
    return _norm_activation_dropout(norm_1d(norm, width), activation, dropout)


def conv_block(
    channels: int, *, activation: str = "relu", dropout: float = 0.0, norm: str = "none"
) -> list[nn.Module]:
    """What follows a hidden convolution of ``channels`` outputs: ``[norm], activation, [dropout]``."""
    return _norm_activation_dropout(norm_2d(norm, channels), activation, dropout)


def _norm_activation_dropout(
    norm: nn.Module | None, activation: str, dropout: float
) -> list[nn.Module]:
    layers: list[nn.Module] = [] if norm is None else [norm]
    layers.append(make_activation(activation))
    if dropout:
        layers.append(nn.Dropout(dropout))
    return layers


def mlp(
    in_dim: int,
    hidden_dims: Sequence[int],
    out_dim: int,
    *,
    activation: str = "relu",
    dropout: float = 0.0,
    norm: str = "none",
) -> nn.Sequential:
    """``Linear -> [norm] -> activation -> [dropout]`` per hidden layer, then a final ``Linear``.

    With no hidden layers it is a linear map. The defaults give ``Linear -> ReLU`` layers.
    """
    check_options(activation, dropout, norm, NORMS)
    layers: list[nn.Module] = []
    width = in_dim
    for h in check_positive_ints("hidden_dims", hidden_dims):
        layers += [
            nn.Linear(width, h),
            *activation_block(h, activation=activation, dropout=dropout, norm=norm),
        ]
        width = h
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def mlp_trunk(
    in_dim: int,
    hidden_dims: Sequence[int],
    *,
    activation: str = "relu",
    dropout: float = 0.0,
    norm: str = "none",
) -> tuple[nn.Module, int]:
    """Hidden layers that end in the activation (a feature network), and their output width.

    ``()`` gives :class:`torch.nn.Identity` and ``in_dim``.
    """
    hidden = check_positive_ints("hidden_dims", hidden_dims)
    if not hidden:
        return nn.Identity(), in_dim
    opts = {"activation": activation, "dropout": dropout, "norm": norm}
    trunk = nn.Sequential(
        mlp(in_dim, hidden[:-1], hidden[-1], **opts), *activation_block(hidden[-1], **opts)
    )
    return trunk, hidden[-1]


def check_conv_shape(data_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The convolutional networks take ``(C, H, W)`` images with H and W divisible by 4."""
    if len(data_shape) != 3 or data_shape[1] % 4 or data_shape[2] % 4:
        raise ConfigError(
            "the convolutional networks need images of shape (C, H, W) with H and W divisible "
            f"by 4 (e.g. (1, 28, 28), (3, 32, 32)), got {tuple(data_shape)}; use --network mlp"
        )
    c, h, w = data_shape
    return c, h, w


def flat_apply(
    net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, event_dims: int
) -> torch.Tensor:
    """Apply ``net`` (a module or function that takes one batch dimension) to ``x`` with any number of them.

    The leading ``x.dim() - event_dims`` dimensions are flattened into one and restored on the
    output: ``(*batch, *event) -> (*batch, *net_output_event)``.
    """
    batch = x.shape[: x.dim() - event_dims]
    out = net(x.reshape(-1, *x.shape[x.dim() - event_dims :]))
    return out.reshape(*batch, *out.shape[1:])


class ResidualBlock(nn.Module):
    r"""Two 3x3 convolutions with a skip connection, optionally down- or upsampling by 2.

    .. math:: y = \sigma\big(\mathrm{N}(W_2 * \sigma(\mathrm{N}(W_1 * x))) + S x\big)

    ``S`` is the identity when shape and channels are kept, else a 1x1 convolution (strided
    when downsampling) with its normalisation. ``resample="down"`` makes the first convolution
    stride 2; ``"up"`` doubles H and W first (nearest neighbour), then convolves.

    Args:
        in_channels: input feature maps.
        out_channels: output feature maps.
        resample: ``"down"``, ``"up"`` or ``"none"``.
        activation: a name in :data:`ACTIVATIONS`.
        dropout: dropout probability after the first convolution.
        norm: one of :data:`CONV_NORMS`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resample: str = "none",
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "group",
    ) -> None:
        super().__init__()
        check_options(activation, dropout, norm, CONV_NORMS)
        if resample not in ("none", "down", "up"):
            raise ConfigError(f"`resample` must be 'none', 'down' or 'up', got {resample!r}")
        stride = 2 if resample == "down" else 1
        bias = norm == "none"  # a normalisation's shift replaces the bias
        self.up: nn.Module = (
            nn.Upsample(scale_factor=2, mode="nearest") if resample == "up" else nn.Identity()
        )
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = norm_2d(norm, out_channels) or nn.Identity()
        self.act1 = make_activation(activation)
        self.drop: nn.Module = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = norm_2d(norm, out_channels) or nn.Identity()
        if stride == 1 and in_channels == out_channels:
            self.skip: nn.Module = nn.Identity()
        else:
            self.skip = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias),
                norm_2d(norm, out_channels) or nn.Identity(),
            )
        self.act2 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_channels, H, W) -> (N, out_channels, H', W')``."""
        x = self.up(x)
        out = self.drop(self.act1(self.norm1(self.conv1(x))))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.skip(x))


def residual_stage(
    in_channels: int,
    out_channels: int,
    blocks: int,
    resample: str,
    *,
    activation: str = "relu",
    dropout: float = 0.0,
    norm: str = "group",
) -> nn.Sequential:
    """``blocks`` residual blocks; the first resamples and changes the channels."""
    opts = {"activation": activation, "dropout": dropout, "norm": norm}
    layers = [ResidualBlock(in_channels, out_channels, resample, **opts)]
    layers += [ResidualBlock(out_channels, out_channels, "none", **opts) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Decoder(nn.Module):
    r"""Base class of decoders: :math:`\eta = f_\theta([h, y])`, the likelihood's parameters.

    ``forward(h, y=None)`` maps ``h`` of shape ``(*batch, in_dim)`` (and a conditioning vector
    ``y`` of width ``cond_dim``, e.g. a one-hot label, when ``cond_dim > 0``) to a tensor of
    shape ``(*batch, params_per_element, *data_shape)``. Subclasses define :meth:`forward`;
    :meth:`condition` and :meth:`unflatten` do the shared bookkeeping.

    Args:
        in_dim: width of the latent features (the prior's ``embed_dim``).
        data_shape: shape of one data point.
        params_per_element: P, outputs per data element (from the likelihood).
        cond_dim: width of an optional conditioning vector, 0 for none.
    """

    def __init__(
        self,
        in_dim: int,
        data_shape: tuple[int, ...],
        params_per_element: int = 1,
        cond_dim: int = 0,
    ) -> None:
        super().__init__()
        self.in_dim = int(in_dim)
        self.data_shape = tuple(int(s) for s in data_shape)
        self.params_per_element = int(params_per_element)
        self.cond_dim = int(cond_dim)
        if self.in_dim <= 0 or self.params_per_element <= 0 or self.cond_dim < 0:
            raise ConfigError(
                "a decoder needs in_dim > 0, params_per_element > 0 and cond_dim >= 0, got "
                f"{self.in_dim}, {self.params_per_element} and {self.cond_dim}"
            )

    @property
    def out_features(self) -> int:
        """Outputs per input row: ``params_per_element * prod(data_shape)``."""
        return self.params_per_element * int(torch.Size(self.data_shape).numel())

    def condition(self, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """``[h, y]`` with ``y`` broadcast over h's leading dimensions (``h`` if no ``y``)."""
        if y is None:
            if self.cond_dim:
                raise ConfigError(
                    f"the decoder was built for a conditioning vector of width {self.cond_dim} "
                    "but got none"
                )
            return h
        if y.shape[-1] != self.cond_dim:
            raise ConfigError(
                f"the decoder was built for a conditioning vector of width {self.cond_dim}, "
                f"got shape {tuple(y.shape)}"
            )
        return torch.cat([h, y.expand(*h.shape[:-1], y.shape[-1])], dim=-1)

    def unflatten(self, out: torch.Tensor) -> torch.Tensor:
        """``(*batch, P * prod(data_shape)) -> (*batch, P, *data_shape)``."""
        return out.reshape(*out.shape[:-1], self.params_per_element, *self.data_shape)

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Map ``(*batch, in_dim)`` features to ``(*batch, P, *data_shape)`` parameters."""
        raise NotImplementedError(f"{type(self).__name__} must define forward(h, y=None)")
