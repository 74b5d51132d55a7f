r"""The label-guide contract: a classifier :math:`q(y \mid x)` plus how the SSVAE treats ``y``.

A label guide is the inference network for the class of an unlabelled point in the
semi-supervised VAE (Kingma et al. 2014, "M2"). It has two jobs:

1. **The classifier.** ``forward(x)`` returns the logits of :math:`q(y \mid x)` and
   :meth:`LabelGuide.dist` the :class:`~pyro.distributions.Categorical` they define. The network
   is sized from the data shape: an MLP for flat or small data, a small convolutional network for
   ``(C, H, W)`` images of at least 16x16 (H and W divisible by 4).
2. **The strategy** for the unobserved ``y`` (one module per strategy in this package):

   * :meth:`LabelGuide.sample` puts the guide's ``"y"`` site (value: a one-hot vector, or a
     relaxed one on the simplex) with whatever ``infer`` options the strategy needs;
   * :meth:`LabelGuide.prior` is the distribution the *model's* ``"y"`` site uses, given the
     class prior's logits, so that :math:`\log p(y) - \log q(y \mid x)` is consistent with the
     values the guide produces;
   * :attr:`LabelGuide.estimator` names the ELBO estimator (``ppl_vae.make_elbo`` name) that
     trains the pair: ``"enum"``, ``"trace"`` or ``"tracegraph"``;
   * :meth:`LabelGuide.anneal` is called with training progress in [0, 1] (temperatures).

``y`` is represented as a one-hot vector of ``num_classes`` floats everywhere in the model and
the guide (the decoder and the encoder read it as a conditioning vector), so every strategy
shares the same model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ...models.decoders import check_conv_shape, mlp
from ...models.errors import ConfigError
from ...models.likelihoods.base import check_data_shape

NETWORKS = ("auto", "mlp", "conv")


def choose_classifier_network(network: str, data_shape: tuple[int, ...]) -> str:
    """``auto``: convolutional for ``(C, H, W)`` images of at least 16x16 (H, W divisible by 4)."""
    if network not in NETWORKS:
        raise ConfigError(f"Unknown network {network!r}; expected one of {list(NETWORKS)}")
    if network == "auto":
        image = len(data_shape) == 3 and data_shape[1] >= 16 and data_shape[2] >= 16
        return "conv" if image and data_shape[1] % 4 == 0 and data_shape[2] % 4 == 0 else "mlp"
    return network


class _FlatMLP(nn.Module):
    """An MLP on the flattened trailing ``data_shape`` dimensions; any leading batch dims."""

    def __init__(
        self, data_shape: tuple[int, ...], hidden_dims: Sequence[int], out_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.data_shape = data_shape
        numel = int(torch.Size(data_shape).numel())
        layers: list[nn.Module] = []
        width = numel
        for h in hidden_dims:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[: x.dim() - len(self.data_shape)]
        return self.net(x.reshape(*batch, -1))


class _ConvNet(nn.Module):
    """``Conv(C, c0, 4, 2) -> Conv(c0, c1, 4, 2) -> MLP(hidden_dims) -> out_dim``."""

    def __init__(
        self,
        data_shape: tuple[int, ...],
        hidden_dims: Sequence[int],
        out_dim: int,
        dropout: float,
        channels: Sequence[int],
    ) -> None:
        super().__init__()
        c, h, w = check_conv_shape(tuple(data_shape))
        self.data_shape = (c, h, w)
        c0, c1 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(c, c0, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c0, c1, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        layers.append(mlp(c1 * (h // 4) * (w // 4), hidden_dims, out_dim))
        self.fc = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[:-3]
        out = self.fc(self.conv(x.reshape(-1, *self.data_shape)))
        return out.reshape(*batch, out.shape[-1])


def positive_ints(values: Any, name: str) -> tuple[int, ...]:
    """``values`` as a tuple of positive ints, or a :class:`ConfigError` naming ``name``."""
    ok = isinstance(values, Sequence) and not isinstance(values, str)
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok:
        raise ConfigError(f"`{name}` must be a list of positive integers, got {values!r}")
    return tuple(int(v) for v in values)


def build_network(
    data_shape: tuple[int, ...],
    out_dim: int,
    hidden_dims: Sequence[int] = (256,),
    network: str = "auto",
    dropout: float = 0.0,
    channels: Sequence[int] = (32, 64),
) -> nn.Module:
    r"""A network ``(*batch, *data_shape) -> (*batch, out_dim)``: MLP or convolutional.

    Args:
        data_shape: shape of one data point.
        out_dim: output width (``num_classes`` for a classifier, 1 for a baseline).
        hidden_dims: hidden widths of the fully connected part; ``()`` gives a linear map.
        network: ``"auto"``, ``"mlp"`` or ``"conv"`` (see :func:`choose_classifier_network`).
        dropout: dropout probability after each hidden layer (MLP) or before the fully
            connected part (conv); 0 for none.
        channels: feature maps of the two convolution stages.
    """
    hidden = positive_ints(hidden_dims, "hidden_dims")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ConfigError(f"`dropout` must be a number in [0, 1), got {dropout!r}")
    if choose_classifier_network(network, data_shape) == "conv":
        pair = positive_ints(channels, "channels")
        if len(pair) != 2:
            raise ConfigError(f"`channels` must be two positive integers, got {channels!r}")
        return _ConvNet(data_shape, hidden, out_dim, float(dropout), pair)
    return _FlatMLP(data_shape, hidden, out_dim, float(dropout))


class LabelGuide(nn.Module):
    r"""Base class of label guides: the classifier :math:`q_\phi(y \mid x)` and its strategy.

    .. math:: q_\phi(y \mid x) = \mathrm{Categorical}\big(y;\ \mathrm{softmax}(f_\phi(x))\big)

    Subclasses set :attr:`estimator` and override :meth:`sample` (and, if the values of ``y``
    are not one-hot vectors, :meth:`prior`).

    Args:
        data_shape: shape of one data point, ``(D,)`` or ``(C, H, W)``.
        num_classes: K, the number of classes.
        hidden_dims: hidden widths of the classifier; ``()`` gives a linear classifier.
        network: ``"auto"``, ``"mlp"`` or ``"conv"``.
        dropout: dropout probability in the classifier (0: none).
        channels: feature maps of the convolutional classifier's two stages.

    Attributes:
        estimator: name of the ELBO estimator (``ppl_vae.make_elbo``) this strategy needs.
        max_plate_nesting: plates the estimator must allow for (the data plate).
    """

    estimator: ClassVar[str] = "trace"
    max_plate_nesting: ClassVar[int] = 1

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: int,
        hidden_dims: Sequence[int] = (256,),
        network: str = "auto",
        dropout: float = 0.0,
        channels: Sequence[int] = (32, 64),
    ) -> None:
        super().__init__()
        shape = check_data_shape(data_shape)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"`num_classes` must be an integer >= 2, got {num_classes!r}")
        self.data_shape = shape
        self.num_classes = num_classes
        self.hidden_dims = positive_ints(hidden_dims, "hidden_dims")
        self.network = network
        self.dropout = dropout
        self.channels = positive_ints(channels, "channels")
        if len(self.channels) != 2:
            raise ConfigError(f"`channels` must be two positive integers, got {channels!r}")
        self.net = build_network(shape, num_classes, self.hidden_dims, network, dropout, channels)

    # -- the classifier -------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        n = len(self.data_shape)
        if x.dim() < n + 1 or tuple(x.shape[-n:]) != self.data_shape:
            raise ConfigError(
                f"data has shape {tuple(x.shape)} but the label guide was built for "
                f"(N, {', '.join(map(str, self.data_shape))})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(y | x), ``(*batch, *data_shape) -> (*batch, num_classes)``."""
        self.check_input(x)
        return self.net(x)

    def dist(self, x: torch.Tensor) -> dist.Categorical:
        """q(y | x) over class indices, batch shape ``(N,)``."""
        return dist.Categorical(logits=self(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class of each point, ``(N,)`` int64."""
        return self(x).argmax(-1)

    # -- the strategy ---------------------------------------------------------------------------
    def prior(self, logits: torch.Tensor) -> dist.Distribution:
        r"""The model's :math:`p(y)` over the values :meth:`sample` produces (one-hot vectors).

        Args:
            logits: class prior logits ``(K,)`` (uniform: zeros).
        """
        return dist.OneHotCategorical(logits=logits)

    def guide_dist(self, x: torch.Tensor) -> dist.Distribution:
        """q(y | x) over one-hot vectors, batch ``(N,)``, event ``(num_classes,)``."""
        return dist.OneHotCategorical(logits=self(x))

    def infer(self, x: torch.Tensor) -> dict[str, Any]:
        """The ``infer`` options of the guide's ``y`` site."""
        return {}

    def sample(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Put the guide's label site ``name`` (in the caller's data plate); return its value."""
        return pyro.sample(name, self.guide_dist(x), infer=self.infer(x))

    def anneal(self, progress: float) -> None:
        """Hook called by the trainer once per step with training progress in [0, 1]."""
