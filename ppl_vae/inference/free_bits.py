r"""Free bits (Kingma et al. 2016): the ELBO with a floor :math:`\lambda` on the KL of each
latent dimension, so that the optimiser gains nothing by pushing a dimension's KL below it.

For a batch of :math:`N` points and latent dimensions (or groups) :math:`g`,

.. math:: J(x) = -\sum_{i=1}^{N} \mathbb{E}_{q}\big[\log p(x_i \mid z_i)\big]
    + \beta \sum_{g} \max\Big(N \lambda_g,\; \sum_{i=1}^{N} \mathrm{KL}_{i,g}\Big),

i.e. :math:`N` times the minibatch objective of the paper, :math:`\max(\lambda, \mathbb{E}_x
\mathrm{KL}_g)` per group, in the engine's summed convention. The groups are found from the
Pyro traces of any model/guide pair, site by site:

- a site whose q and p both factorise over its last dimension (``Independent`` of univariate
  distributions: Gaussian, von Mises, ...) has one group per dimension, with the analytic KL per
  dimension where :func:`~pyro.distributions.kl.kl_divergence` has it and
  :math:`\log q(z_d) - \log p(z_d)` at the draw otherwise (``analytic`` says which);
- any other site (a mixture or flow prior, an IAF posterior, a discrete site) is one group of
  :math:`D` dimensions with floor :math:`D\lambda` and the Monte Carlo KL :math:`\log q(z) -
  \log p(z \mid \mathrm{pa})` at the draw.

The expectation over :math:`q` is one reparameterised draw per particle (``num_particles``
averaged), as ``Trace_ELBO``; sites' own ``poutine.scale`` factors are replaced by :math:`\beta`
(the KL weight) for latent sites and 1 for observed ones. Below the floor a group's KL gets no
gradient, which is the point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.poutine.util import prune_subsample_sites

from ..models.errors import ConfigError

__all__ = ["FreeBitsLoss", "site_kl_groups"]


def _factors(d: Any) -> Any:
    """The univariate base of a distribution with event shape ``(D,)`` that factorises over its
    last dimension (``Independent(base, 1)``, possibly expanded), else None."""
    while type(d).__name__ == "ExpandedDistribution":
        d = d.base_dist
    if isinstance(d, torch.distributions.Independent) and d.reinterpreted_batch_ndims == 1:
        base = d.base_dist
        if tuple(base.event_shape) == ():
            return base
    return None


def site_kl_groups(q: Any, p: Any, z: torch.Tensor) -> tuple[torch.Tensor, bool, int]:
    """The KL of one latent site by group: ``(terms, analytic, dims_per_group)``.

    ``terms`` is ``(*batch, D)`` for a factorised site (one group per dimension) or ``(*batch,
    1)`` for a site that is one group of ``dims_per_group`` dimensions.
    """
    q_base, p_base = _factors(q), _factors(p)
    if q_base is not None and p_base is not None:
        try:
            return kl_divergence(q_base, p_base).expand(z.shape), True, 1
        except NotImplementedError:
            return q_base.log_prob(z) - p_base.log_prob(z), False, 1
    dims = int(torch.Size(q.event_shape).numel()) or 1
    return (q.log_prob(z) - p.log_prob(z)).unsqueeze(-1), False, dims


class FreeBitsLoss:
    r"""``loss(x, beta) -> J(x)`` of the module docstring for a model/guide pair.

    Args:
        model: the model program ``model(x)``.
        guide: the guide program ``guide(x)``.
        free_bits: :math:`\lambda`, nats per latent dimension (> 0).
        num_particles: draws of z per step, averaged.
    """

    def __init__(
        self, model: Callable, guide: Callable, free_bits: float, num_particles: int = 1
    ) -> None:
        if not free_bits > 0:
            raise ConfigError(f"`free_bits` must be > 0 for a free-bits loss, got {free_bits}")
        self.model, self.guide = model, guide
        self.free_bits = float(free_bits)
        self.num_particles = int(num_particles)
        self.analytic: dict[str, bool] = {}

    def __call__(self, x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        total = x.new_zeros(())
        for _ in range(self.num_particles):
            total = total + self._particle(x, beta)
        return total / self.num_particles

    def _particle(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        guide_tr = prune_subsample_sites(poutine.trace(self.guide).get_trace(x))
        model_tr = prune_subsample_sites(
            poutine.trace(poutine.replay(self.model, trace=guide_tr)).get_trace(x)
        )
        n = x.shape[0]
        recon = x.new_zeros(())
        kl = x.new_zeros(())
        for name, site in model_tr.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                recon = recon + site["fn"].log_prob(site["value"]).sum()
                continue
            if name not in guide_tr.nodes:
                raise ConfigError(f"free bits: the guide does not sample latent site {name!r}")
            q = guide_tr.nodes[name]["fn"]
            terms, analytic, dims = site_kl_groups(q, site["fn"], site["value"])
            self.analytic[name] = analytic
            per_group = terms.reshape(-1, terms.shape[-1]).sum(0)  # summed over the batch
            kl = kl + per_group.clamp_min(n * self.free_bits * dims).sum()
        return -recon + beta * kl


def free_bits_loss(cfg: Any, model: Callable, guide: Callable, elbo: Any) -> FreeBitsLoss | None:
    """The run's free-bits loss when ``cfg.free_bits > 0`` (None otherwise); only the pathwise
    estimators ``trace`` and ``meanfield`` take a floor (the others are other bounds)."""
    if not getattr(cfg, "free_bits", 0):
        return None
    if cfg.estimator not in ("trace", "meanfield"):
        raise ConfigError(
            f"`free_bits` floors the KL of the pathwise ELBO; use estimator trace or meanfield, "
            f"not {cfg.estimator!r}"
        )
    return FreeBitsLoss(model, guide, cfg.free_bits, getattr(elbo, "num_particles", 1))
