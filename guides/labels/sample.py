r"""Sampled labels: discrete draws of y, score-function gradients with a learned baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .base import LabelGuide, build_network, positive_ints


class _Baseline(nn.Module):
    """A network ``x -> b(x)`` of shape ``(*batch,)``: the learned control variate."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class SampledLabelGuide(LabelGuide):
    r"""q(y | x) sampled exactly; :math:`\phi` learns by the score function with a learned baseline.

    .. math:: \nabla_\phi\,\mathcal{U} \approx \nabla_\phi \log q_\phi(y \mid x)\,
        \big[c(x, y, z) - b_\psi(x)\big] + \text{pathwise terms}, \qquad
        \min_\psi \big(c(x, y, z) - b_\psi(x)\big)^2

    where :math:`c` is the Rao-Blackwellised downstream cost of the ``y`` site (its own
    :math:`\log p(y) - \log q(y \mid x)` and everything downstream of it for the same data
    point). The guide's ``y`` site carries
    ``infer={"baseline": {"nn_baseline": b, "nn_baseline_input": x}}`` and
    :class:`~pyro.infer.TraceGraph_ELBO` builds the surrogate loss, including the baseline's
    squared-error loss (Mnih & Gregor 2014). The baseline network has the classifier's
    architecture with one output.

    Unbiased for every K, one forward pass per point (no K-fold cost as with enumeration), but
    the gradient of :math:`\phi` from unlabelled data is noisy.

    Args:
        data_shape, num_classes, hidden_dims, network, dropout, channels: see
            :class:`~ppl_vae.guides.labels.base.LabelGuide`.
        baseline_hidden_dims: hidden widths of the baseline network (default: ``hidden_dims``).

    References:
        Mnih, A. and Gregor, K. (2014). Neural variational inference and learning in belief
        networks. ICML.
    """

    estimator: ClassVar[str] = "tracegraph"

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: int,
        hidden_dims: Sequence[int] = (256,),
        network: str = "auto",
        dropout: float = 0.0,
        channels: Sequence[int] = (32, 64),
        baseline_hidden_dims: Sequence[int] | None = None,
    ) -> None:
        super().__init__(data_shape, num_classes, hidden_dims, network, dropout, channels)
        hidden = (
            self.hidden_dims
            if baseline_hidden_dims is None
            else positive_ints(baseline_hidden_dims, "baseline_hidden_dims")
        )
        self.baseline = _Baseline(
            build_network(self.data_shape, 1, hidden, network, 0.0, self.channels)
        )

    def infer(self, x: torch.Tensor) -> dict[str, Any]:
        return {"baseline": {"nn_baseline": self.baseline, "nn_baseline_input": x}}
