r"""The per-step loss used by the training loop.

:func:`build_loss` returns ``loss(x) -> Tensor``: the estimator's differentiable loss on the VAE's
model/guide pair, i.e. ``elbo.differentiable_loss(vae.model, vae.guide, x)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def build_loss(elbo: Any, vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training loss for ``vae`` under ``elbo`` (a registered estimator)."""

    def loss(x: torch.Tensor) -> torch.Tensor:
        return elbo.differentiable_loss(vae.model, vae.guide, x)

    return loss
