r"""Exact enumeration over the classes: ``TraceEnum_ELBO`` sums over y instead of sampling it."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import LabelGuide


class EnumeratedLabelGuide(LabelGuide):
    r"""q(y | x) whose ``y`` site is enumerated in parallel, so the unlabelled bound is exact in y.

    .. math:: \mathcal{U}(x) = \sum_{k=1}^{K} q_\phi(k \mid x)\,\big[\mathcal{L}(x, k)
        - \log q_\phi(k \mid x)\big],
        \qquad \mathcal{L}(x, y) = \mathbb{E}_{q(z \mid x, y)}\Big[\log
        \frac{p(x \mid y, z)\,p(y)\,p(z)}{q(z \mid x, y)}\Big]

    The guide's ``y`` site carries ``infer={"enumerate": "parallel"}`` (what
    :func:`pyro.infer.config_enumerate` sets), and :class:`~pyro.infer.TraceEnum_ELBO` with
    ``max_plate_nesting=1`` evaluates every class in one batched pass: ``y`` takes the value of
    all K one-hot vectors along a new dimension left of the data plate, ``z`` is drawn once per
    class and the K terms are weighted by :math:`q_\phi(k \mid x)`. No gradient estimator is
    needed for :math:`\phi`: the sum is differentiated exactly. The cost is K passes of the
    encoder head and the decoder per point (the feature networks run once).

    Args:
        data_shape, num_classes, hidden_dims, network, dropout, channels: see
            :class:`~ppl_vae.guides.labels.base.LabelGuide`.

    References:
        Kingma, D. P., Rezende, D. J., Mohamed, S. and Welling, M. (2014). Semi-supervised
        learning with deep generative models. NeurIPS.
    """

    estimator: ClassVar[str] = "enum"

    def infer(self, x: torch.Tensor) -> dict[str, Any]:
        return {"enumerate": "parallel"}
