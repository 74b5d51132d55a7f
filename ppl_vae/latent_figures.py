r"""Figures of the latent space: traversals, posterior histograms and KL per dimension.

For every kind (the VAE's ``z``, M2's ``z`` with y at the predicted class, every latent site of a
user's pair; a hierarchy gets one of each per layer), geometry-aware where the prior is:

- ``traversals_<site>.png``: each dimension swept across the prior's quantiles
  (:data:`TRAVERSAL_QUANTILES`; von Mises: angles around the circle, :math:`[-\pi, \pi)`;
  spike-and-slab: the mixture's exact quantiles, exact zeros included), the other dimensions
  held at a test point's posterior mean, decoded to the likelihood's mean; one row per
  dimension, most informative first, dimensions below :data:`INACTIVE_KL` nats marked inactive;
- ``posterior_<site>.png``: histograms of q's location and scale per dimension over the test
  split (von Mises: circular means on circles and concentrations; spike-and-slab: the slab's
  location and scale, and the share of exact-zero codes);
- ``kl_per_dimension.png``: KL per dimension as bars, one panel per latent site, recomputed on
  the test split by :func:`~ppl_vae.training.diagnostics.latent_terms`, with the last history
  row's ``kl_<site>_<d>`` (validation split) beside it.

What a latent dimension's geometry asks of the figures is said by the component, not recognised
here (none of the hooks is required; von Mises and spike-and-slab define them in
:mod:`ppl_vae.models.distributions`):

- ``traversal_values(quantiles) -> Tensor`` on a prior module or on p(z) (the distribution, or
  the elementwise one under ``to_event`` / ``expand``): the values a traversal sweeps for the
  quantiles ``(Q,)`` (float64), ``(Q, D)`` from a prior, ``(Q, *batch_shape)`` from a
  distribution; with ``traversal_grid`` (its name, :attr:`TraversalResult.grid`) and
  ``traversal_description`` (what the values are, in words, for the figure's title). Without it:
  the elementwise ``icdf`` (``"quantile"``), else quantiles of :data:`QUANTILE_DRAWS` prior
  draws (``"empirical"``);
- ``circular = True`` on a distribution: its values are angles (traversal columns in degrees,
  posterior histograms on circles);
- ``histogram_parts() -> (location name, location, spread name, spread)`` on q's distribution:
  what the posterior histograms show (default: ``loc`` and ``scale``, else the mean);
- ``exact_zeros = True`` on q's distribution: the figures report the share of exact-zero codes.

The numbers are small functions of a distribution or a Pyro pair (:func:`traversal_values`,
:func:`traversal_codes`, :func:`kl_per_dimension`, :func:`inactive_dims`, :func:`kl_order`), so
they are checked without comparing images. A :class:`LatentView` says, for one kind, which sites
are traversed, from which code and through which decoder (:func:`vae_view`, :func:`m2_view`,
:func:`pair_view`); :func:`write_latent_figures` draws the figures, :func:`plot_run` reopens a
run directory and draws them (``ppl-vae plot``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import Independent, TransformedDistribution

from .figures import as_images, new_figure
from .models.errors import ConfigError
from .progress import progress_bar

__all__ = [
    "INACTIVE_KL",
    "LATENT_FIGURES",
    "TRAVERSAL_QUANTILES",
    "LatentFigures",
    "LatentView",
    "SiteKL",
    "SitePosterior",
    "Traversable",
    "TraversalResult",
    "history_kl",
    "inactive_dims",
    "kl_order",
    "kl_per_dimension",
    "m2_view",
    "pair_view",
    "plot_run",
    "posterior_summary",
    "read_history",
    "row_titles",
    "traversal_codes",
    "traversal_description",
    "traversal_grid_kind",
    "traversal_values",
    "vae_view",
    "write_latent_figures",
]

#: Prior quantiles a traversal sweeps (a circular dimension sweeps as many angles instead).
TRAVERSAL_QUANTILES = tuple(float(q) for q in np.linspace(0.05, 0.95, 9))
#: A dimension whose KL per point is below this many nats is marked inactive.
INACTIVE_KL = 0.01
#: Prior draws behind empirical quantiles, for a prior without a quantile function.
QUANTILE_DRAWS = 20000
#: At most this many dimensions (the most informative) get traversal rows / histograms.
MAX_TRAVERSAL_DIMS = 32
MAX_HISTOGRAM_DIMS = 10
#: Test points for the histograms and the KL (the first ones).
LATENT_POINTS = 2000
#: The figures ``ppl-vae plot --which`` chooses from.
LATENT_FIGURES = ("traversals", "histograms", "kl")


# -- distributions ------------------------------------------------------------------------------
def _unwrap(d: Any) -> Any:
    """The elementwise distribution under ``to_event`` / ``expand`` / ``mask`` wrappers."""
    while True:
        if isinstance(d, Independent):
            d = d.base_dist
        elif type(d).__name__ in ("ExpandedDistribution", "MaskedDistribution"):
            d = d.base_dist
        else:
            return d


def _is_circular(d: Any) -> bool:
    """The distribution says its values are angles (``circular = True``)."""
    return bool(getattr(d, "circular", False))


def _is_discrete(fn: Any) -> bool:
    return bool(getattr(getattr(fn, "support", None), "is_discrete", False))


def _with_hook(p: Any) -> tuple[Any, Any]:
    """p(z) (a prior module is called) and the object whose ``traversal_values`` applies: the
    prior module, else p(z), else its elementwise distribution; None where none defines it."""
    if isinstance(p, torch.nn.Module):
        if callable(getattr(p, "traversal_values", None)):
            return p(), p
        p = p()
    for d in (p, _unwrap(p)):
        if callable(getattr(d, "traversal_values", None)):
            return p, d
    return p, None


def traversal_grid_kind(p: Any) -> str:
    """How :func:`traversal_values` sweeps p(z): the ``traversal_grid`` of the prior's or the
    distribution's ``traversal_values`` hook (``"custom"`` where the hook names none; von Mises:
    ``"circular"``, spike-and-slab: ``"spike_and_slab"``), else ``"quantile"`` (the elementwise
    distribution's ``icdf``) or ``"empirical"`` (quantiles of prior draws)."""
    p, source = _with_hook(p)
    if source is not None:
        return str(getattr(source, "traversal_grid", "custom"))
    base = _unwrap(p)
    if base.event_shape != () or isinstance(base, TransformedDistribution):
        return "empirical"  # a joint transform (a flow) has no marginal icdf
    try:
        base.icdf(torch.full_like(base.mean, 0.5))
    except (NotImplementedError, AttributeError, RuntimeError, ValueError):
        return "empirical"
    return "quantile"


def _per_dimension(values: Any, source: Any, n: int, d: int) -> torch.Tensor:
    """A hook's values ``(Q, ...)`` as ``(Q, D)`` (batch ``(1,)`` or a shared value broadcast)."""
    v = torch.as_tensor(values)
    per_row = v[0].numel() if v.dim() else 0
    if v.dim() == 0 or v.shape[0] != n or (per_row != 1 and per_row % d):
        raise ConfigError(
            f"{type(source).__name__}.traversal_values returned shape {tuple(v.shape)} for {n} "
            f"quantiles; expected ({n}, {d})"
        )
    v = v.reshape(n, -1)
    if v.shape[1] == 1:
        v = v.expand(n, d)
    return v.reshape(n, -1, d)[:, 0]


@torch.no_grad()
def traversal_values(
    p: Any, quantiles: Iterable[float] = TRAVERSAL_QUANTILES, num_samples: int = QUANTILE_DRAWS
) -> torch.Tensor:
    r"""The values a traversal gives each latent dimension, ``(Q, D)``.

    ``p`` is p(z) with event shape ``(D,)`` and batch shape ``()`` or ``(1,)``, or a prior
    module (whose own ``traversal_values`` hook is asked first, then p(z)'s). Per
    :func:`traversal_grid_kind`:

    - a hook's values (von Mises: Q angles around the circle from the location; spike-and-slab:
      the mixture's exact quantiles, exact zeros included);
    - ``quantile``: :math:`F_d^{-1}(q_j)`;
    - ``empirical``: quantiles of ``num_samples`` draws (seeded; the global random streams are
      left as they were).
    """
    p, source = _with_hook(p)
    d = int(p.event_shape[-1])
    q = torch.as_tensor(list(quantiles), dtype=torch.float64).flatten()
    if not len(q) or not bool(((q > 0) & (q < 1)).all()):
        raise ConfigError(f"traversal quantiles must lie in (0, 1), got {q.tolist()}")
    if source is not None:
        return _per_dimension(source.traversal_values(q.clone()), source, len(q), d)
    kind = traversal_grid_kind(p)
    if kind == "empirical":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            draws = p.sample((num_samples,))
        draws = draws.reshape(num_samples, -1, d)[:, 0]
        out = np.quantile(draws.double().cpu().numpy(), q.numpy(), axis=0)
        return torch.as_tensor(out, dtype=draws.dtype, device=draws.device)
    base = _unwrap(p)
    ref = base.loc if hasattr(base, "loc") else base.mean
    shape = (len(q), *base.batch_shape)
    qs = q.to(ref.device, ref.dtype).reshape(-1, *([1] * len(base.batch_shape))).expand(shape)
    return base.icdf(qs).reshape(len(q), -1, d)[:, 0]


def traversal_description(p: Any) -> str:
    """How :func:`traversal_values` chose the values, in words: the hook's
    ``traversal_description``, else its owner's name; the prior's quantiles; or empirical
    quantiles of prior draws."""
    p, source = _with_hook(p)
    if source is not None:
        words = getattr(source, "traversal_description", None)
        return str(words) if words else f"the values of {type(source).__name__}.traversal_values"
    if traversal_grid_kind(p) == "quantile":
        return "the prior's quantiles"
    return f"empirical quantiles of {QUANTILE_DRAWS} prior draws"


def traversal_codes(
    p: Any, z0: torch.Tensor, quantiles: Iterable[float] = TRAVERSAL_QUANTILES
) -> torch.Tensor:
    """The codes of a traversal, ``(D, Q, D)``: ``codes[d, j]`` is ``z0`` ``(D,)`` with dimension
    ``d`` set to ``traversal_values(p, quantiles)[j, d]``."""
    return _codes(traversal_values(p, quantiles).to(z0), z0)


def _codes(values: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    d, n = z0.shape[-1], values.shape[0]
    codes = z0.reshape(1, 1, d).repeat(d, n, 1)
    idx = torch.arange(d, device=z0.device)
    codes[idx, :, idx] = values.T
    return codes


# -- KL per dimension ---------------------------------------------------------------------------
def inactive_dims(kl: torch.Tensor, threshold: float = INACTIVE_KL) -> torch.Tensor:
    """Which dimensions are inactive: KL per point below ``threshold`` nats, ``(D,)`` bool."""
    return torch.as_tensor(kl) < threshold


def kl_order(kl: torch.Tensor) -> list[int]:
    """Dimensions by KL, most informative first (ties: the lower index first)."""
    values = torch.as_tensor(kl, dtype=torch.float64).tolist()
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


@dataclass
class SiteKL:
    """The KL of one latent site per point, averaged over the test points.

    Attributes:
        per_dim: ``(D,)`` where the closed form is elementwise, else None.
        total: the site's KL (analytic, or the one-draw Monte Carlo estimate).
        analytic: whether a closed form was used.
        history: ``(D,)`` from the last history row's ``kl_<site>_<d>`` (validation split), or
            None where the history has no such columns.
        history_total: the last history row's ``kl_<site>``, or None.
    """

    per_dim: torch.Tensor | None
    total: float
    analytic: bool
    history: torch.Tensor | None = None
    history_total: float | None = None

    @property
    def ranking(self) -> torch.Tensor | None:
        """What orders the dimensions and marks them inactive: the test split's KL per
        dimension, else the history's."""
        return self.per_dim if self.per_dim is not None else self.history


def history_kl(row: dict[str, float] | None, site: str, dim: int) -> torch.Tensor | None:
    """``kl_<site>_<d>`` for ``d < dim`` from a history row, ``(D,)``; None if one is missing."""
    keys = [f"kl_{site}_{d}" for d in range(dim)]
    if not row or not all(k in row for k in keys):
        return None
    return torch.tensor([float(row[k]) for k in keys], dtype=torch.float64)


def _site_dims(guide: Any, x: torch.Tensor) -> dict[str, int]:
    """The last dimension of every latent site of ``guide(x)``."""
    trace = prune_subsample_sites(poutine.trace(guide).get_trace(x))
    return {
        name: int(node["value"].shape[-1]) if node["value"].dim() else 1
        for name, node in trace.nodes.items()
        if node["type"] == "sample" and not node["is_observed"]
    }


@torch.no_grad()
def kl_per_dimension(model: Any, guide: Any, x: torch.Tensor, seed: int = 0) -> dict[str, SiteKL]:
    r"""KL per latent site and dimension on ``x`` ``(N, ...)``, by
    :func:`~ppl_vae.training.diagnostics.latent_terms`:

    .. math:: \mathrm{KL}_{s,d} = \frac1N \sum_n \mathrm{KL}\big(q(z_{s,d} \mid \cdot) \,\|\,
        p(z_{s,d} \mid \mathrm{pa}_s)\big)

    A site whose KL is one number per point (a categorical) or a Monte Carlo estimate gets only
    ``total``. Draws are seeded and the global random streams left as they were.
    """
    from .training.diagnostics import latent_terms

    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(seed)
        dims = _site_dims(guide, x[:2])
        terms = latent_terms(model, guide, x)
    out = {}
    for name, s in terms["sites"].items():
        kl = s["kl_per_dim"].double().cpu()
        per_dim = bool(s["analytic"]) and kl.numel() == dims.get(name, -1)
        out[name] = SiteKL(kl if per_dim else None, float(kl.sum()), bool(s["analytic"]))
    return out


# -- posteriors ---------------------------------------------------------------------------------
class _MeanLatents(Messenger):
    """Latent sites take ``data[name]`` (observed, as ``poutine.condition`` does), the others
    their distribution's mean (a draw where it has none); observed sites are left alone."""

    def __init__(self, data: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.data = dict(data or {})

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        if msg["is_observed"] or msg["value"] is not None:
            return
        if msg["name"] in self.data:
            msg["value"], msg["is_observed"] = self.data[msg["name"]], True
            return
        try:
            m = msg["fn"].mean
        except (NotImplementedError, AttributeError):  # no mean (or a plate's subsample site)
            return
        if isinstance(m, torch.Tensor) and bool(torch.isfinite(m).all()):
            msg["value"] = m


def _vector_sites(trace: Any, n: int, latent: bool = True) -> dict[str, Any]:
    """Continuous sites holding one ``(D,)`` vector per data point, in program order."""
    return {
        name: node
        for name, node in prune_subsample_sites(trace).nodes.items()
        if node["type"] == "sample"
        and (not latent or not node["is_observed"])
        and isinstance(node["value"], torch.Tensor)
        and node["value"].dim() == 2
        and node["value"].shape[0] == n
        and not _is_discrete(node["fn"])
    }


@dataclass
class SitePosterior:
    """What q(z_s | .) says about each dimension, per test point.

    Attributes:
        mean: ``(N, D)``: the location (the distribution's ``histogram_parts``: von Mises the
            circular mean in [-pi, pi), spike-and-slab the slab's location), or the mean where
            the family has no location.
        spread: ``(N, D)``: the scale (von Mises: the concentration), or None.
        spread_name: what ``spread`` is.
        circular: the site lives on circles (the distribution's ``circular``).
        zero_share: ``(D,)``: the share of exact-zero codes (eval-mode draws); families with
            ``exact_zeros`` (spike-and-slab) only.
        mean_name: what ``mean`` is.
    """

    mean: torch.Tensor
    spread: torch.Tensor | None
    spread_name: str
    circular: bool
    zero_share: torch.Tensor | None = None
    mean_name: str = "location"


def _param(t: Any, shape: torch.Size) -> torch.Tensor | None:
    """``t`` broadcast to ``shape``, float64 on the CPU; None if it is no tensor or does not."""
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return torch.broadcast_to(t.detach(), shape).double().cpu()
    except RuntimeError:
        return None


@torch.no_grad()
def posterior_summary(
    guide: Any, x: torch.Tensor, fixed: dict[str, torch.Tensor] | None = None, seed: int = 0
) -> dict[str, SitePosterior]:
    """:class:`SitePosterior` of every continuous latent site of ``guide(x)``; the sites in
    ``fixed`` are held at those values and left out."""
    fixed = dict(fixed or {})
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        torch.manual_seed(seed)
        trace = poutine.trace(poutine.condition(guide, data=fixed)).get_trace(x)
    out = {}
    for name, node in _vector_sites(trace, x.shape[0]).items():
        value, base = node["value"], _unwrap(node["fn"])
        zeros = (value == 0).double().mean(0).cpu() if getattr(base, "exact_zeros", False) else None
        circular = _is_circular(base)
        if callable(getattr(base, "histogram_parts", None)):
            mean_name, loc, spread_name, spread = base.histogram_parts()
            loc, spread = _param(loc, value.shape), _param(spread, value.shape)
            if loc is not None:
                out[name] = SitePosterior(loc, spread, spread_name, circular, zeros, mean_name)
                continue
        loc = _param(getattr(base, "loc", None), value.shape)
        scale = _param(getattr(base, "scale", None), value.shape)
        if loc is not None and scale is not None:
            out[name] = SitePosterior(loc, scale, "scale", circular, zeros)
        else:
            try:
                m = node["fn"].mean
                ok = m.shape == value.shape and bool(torch.isfinite(m).all())
            except NotImplementedError:
                ok = False
            mean = (m if ok else value).double().cpu()
            out[name] = SitePosterior(mean, None, "", circular, zeros)
    return out


# -- what each kind traverses -------------------------------------------------------------------
@dataclass
class Traversable:
    """One latent site to traverse.

    Attributes:
        prior: p(z_s), or p(z_s | the sites held); event shape ``(D,)``, batch ``()`` or ``(1,)``;
            or a prior module returning it (its hooks are asked first).
        z0: ``(D,)``, the code the other dimensions keep (a test point's posterior mean).
        decode: codes ``(M, D)`` -> the likelihood's mean ``(M, *data_shape)``.
    """

    prior: Any
    z0: torch.Tensor
    decode: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LatentView:
    """What the latent figures of one trained module read.

    Attributes:
        module: the module (in eval mode while the figures are drawn).
        model: its Pyro model of ``x`` (the KL per dimension).
        guide: its Pyro guide of ``x``.
        x: test points ``(N, ...)``.
        image_shape: how one data point is shown (None: a strip).
        traversable: the sites to traverse, by name.
        fixed: guide sites held for the histograms (M2: ``y`` at the predicted class).
        held: what a traversal holds, in words.
    """

    module: Any
    model: Callable[..., Any]
    guide: Callable[..., Any]
    x: torch.Tensor
    image_shape: tuple[int, ...] | None
    traversable: dict[str, Traversable]
    fixed: dict[str, torch.Tensor] | None = None
    held: str = ""


def _check_point(x: torch.Tensor, point: int) -> None:
    if isinstance(point, bool) or not isinstance(point, int) or not 0 <= point < len(x):
        raise ConfigError(f"the test point must be in [0, {len(x)}), got {point!r}")


@torch.no_grad()
def vae_view(vae: Any, x: torch.Tensor, image_shape: Any, point: int = 0) -> LatentView:
    """The built-in VAE: site ``z``, swept across ``vae.prior`` (the module: its own
    ``traversal_values`` first, then p(z)'s), decoded by ``vae.decode_mean``."""
    _check_point(x, point)
    z0 = vae.posterior_mean(x[point : point + 1])[0]
    site = Traversable(vae.prior, z0, vae.decode_mean)
    held = f"the other dimensions at test point {point}'s posterior mean"
    x = x[:LATENT_POINTS]
    return LatentView(vae, vae.model, vae.guide, x, image_shape, {"z": site}, None, held)


@torch.no_grad()
def m2_view(
    model: Any, x: torch.Tensor, pred: torch.Tensor, image_shape: Any, point: int = 0
) -> LatentView:
    """M2: site ``z`` with y held at the predicted class (p(z | y) there for a class-conditional
    prior), decoded by ``model.decode_mean(z, y)``; ``pred`` ``(N,)`` are the predictions."""
    _check_point(x, point)
    y0 = model.one_hot(pred[point : point + 1], x)
    z0 = model.posterior_mean(x[point : point + 1], pred[point : point + 1])[0]

    def decode(z: torch.Tensor) -> torch.Tensor:
        return model.decode_mean(z, y0.expand(z.shape[0], -1))

    site = Traversable(model.p_z(y0), z0, decode)
    held = (
        f"y at test point {point}'s predicted class {int(pred[point])}, the other dimensions at "
        "its posterior mean"
    )
    x, pred = x[:LATENT_POINTS], pred[:LATENT_POINTS]
    fixed = {"y": model.one_hot(pred, x)}
    return LatentView(model, model.model, model.guide, x, image_shape, {"z": site}, fixed, held)


@torch.no_grad()
def pair_view(module: Any, x: torch.Tensor, image_shape: Any, point: int = 0) -> LatentView:
    """A user's pair, through Pyro traces. Every latent site is held at its posterior mean at a
    test point (the guide run with every site at its mean). Sweeping site s, the sites the model
    draws before s stay held, s takes the traversal's codes, the sites it draws after s (the
    layers below, in a hierarchy) take their conditional means, and the image is the observed
    site's mean. p(z_s) is the model's distribution of s given the held sites."""
    from .kinds.user import observed_site

    _check_point(x, point)
    x0 = x[point : point + 1]
    guide_trace = poutine.trace(_MeanLatents()(module.guide)).get_trace(x0)
    held = {k: v["value"].detach() for k, v in _vector_sites(guide_trace, 1).items()}
    model_trace = poutine.trace(_MeanLatents(held)(module.model)).get_trace(x0)
    order = [k for k in _vector_sites(model_trace, 1, latent=False) if k in held]
    obs = observed_site(module, x0)
    sites = {}
    for i, name in enumerate(order):
        before = {k: held[k] for k in order[:i]}

        def decode(z: torch.Tensor, name: str = name, before: dict = before) -> torch.Tensor:
            data = {k: v.expand(z.shape[0], -1) for k, v in before.items()}
            data[name] = z
            xs = x0.expand(z.shape[0], *x0.shape[1:])
            return (
                poutine.trace(_MeanLatents(data)(module.model)).get_trace(xs).nodes[obs]["fn"].mean
            )

        sites[name] = Traversable(model_trace.nodes[name]["fn"], held[name][0], decode)
    what = (
        f"the rest at test point {point}'s posterior mean (the sites the model draws after it at "
        "their conditional means)"
    )
    x = x[:LATENT_POINTS]
    return LatentView(module, module.model, module.guide, x, image_shape, sites, None, what)


# -- the figures --------------------------------------------------------------------------------
@dataclass
class TraversalResult:
    """One site's traversal.

    Attributes:
        values: ``(Q, D)``, :func:`traversal_values`.
        codes: ``(D, Q, D)``, :func:`traversal_codes`.
        images: ``(D, Q, *data_shape)``, the decoded codes.
        rows: the dimensions shown, top to bottom (most informative first).
        titles: their row titles (:func:`row_titles`).
        grid: :func:`traversal_grid_kind` of the prior.
        circular: the values are angles (the prior's ``circular``).
        description: how the values were chosen, in words (:func:`traversal_description`).
    """

    values: torch.Tensor
    codes: torch.Tensor
    images: torch.Tensor
    rows: list[int]
    titles: list[str]
    grid: str
    circular: bool = False
    description: str = ""


@dataclass
class LatentFigures:
    """What :func:`write_latent_figures` wrote and the numbers it drew them from."""

    paths: list[Path] = field(default_factory=list)
    kl: dict[str, SiteKL] = field(default_factory=dict)
    traversals: dict[str, TraversalResult] = field(default_factory=dict)
    posteriors: dict[str, SitePosterior] = field(default_factory=dict)


def row_titles(site: str, dims: list[int], kl: torch.Tensor | None) -> list[str]:
    """``"z[3]  KL 0.52"`` per dimension, with ``"  · inactive"`` where the KL is below
    :data:`INACTIVE_KL` nats; ``"z[3]"`` without a KL per dimension."""
    if kl is None:
        return [f"{site}[{d}]" for d in dims]
    dead = inactive_dims(kl)
    return [
        f"{site}[{d}]  KL {float(kl[d]):.3g}" + ("  · inactive" if bool(dead[d]) else "")
        for d in dims
    ]


def _shown(kl: torch.Tensor | None, d: int, cap: int) -> list[int]:
    return (kl_order(kl) if kl is not None else list(range(d)))[:cap]


def traverse(
    name: str,
    site: Traversable,
    kl: SiteKL | None = None,
    quantiles: Iterable[float] = TRAVERSAL_QUANTILES,
) -> TraversalResult:
    """Codes, decoded images and rows of one site's traversal (ordered by ``kl.ranking``)."""
    values = traversal_values(site.prior, list(quantiles)).to(site.z0)
    codes = _codes(values, site.z0)
    d, q = codes.shape[:2]
    images = site.decode(codes.reshape(d * q, d))
    images = images.reshape(d, q, *images.shape[1:])
    ranking = kl.ranking if kl is not None else None
    rows = _shown(ranking, d, MAX_TRAVERSAL_DIMS)
    p, source = _with_hook(site.prior)
    return TraversalResult(
        values,
        codes,
        images,
        rows,
        row_titles(name, rows, ranking),
        traversal_grid_kind(site.prior),
        _is_circular(source) or _is_circular(_unwrap(p)),
        traversal_description(site.prior),
    )


def _columns(t: TraversalResult, quantiles: list[float]) -> tuple[list[str], str]:
    """Column labels of a traversal (with the value, where every dimension shares it) and how
    its values were chosen, in words."""
    v = t.values.double().cpu()
    shared = bool((v == v[:, :1]).all())
    n = len(quantiles)
    if t.circular:
        if shared:
            return [f"{math.degrees(float(a)):+.0f}°" for a in v[:, 0]], (
                f"{n} angles around the circle [-π, π)"
            )
        return [f"μ{-180 + 360 * j / n:+.0f}°" for j in range(n)], (
            f"{n} angles around the circle, from the prior's location μ"
        )
    cols = [
        f"q={q:g}" + (f"\nz={float(v[j, 0]):.2g}" if shared else "")
        for j, q in enumerate(quantiles)
    ]
    return cols, t.description


def traversal_figure(
    path: Path, images: np.ndarray, titles: list[str], columns: list[str], suptitle: str
) -> Path:
    """Rows of images ``(R, Q, H, W[, 3])`` in [0, 1] as one mosaic with row and column labels."""
    r, q, h, w = images.shape[:4]
    pad = max(1, h // 8)
    canvas = np.ones(((h + pad) * r - pad, (w + pad) * q - pad, *images.shape[4:]))
    for i in range(r):
        for j in range(q):
            canvas[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = images[
                i, j
            ]
    cell = 0.75 * min(h / max(w, 1), 2.0)
    fig = new_figure(figsize=(2.6 + 0.75 * q, 1.1 + cell * r))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.set_yticks([i * (h + pad) + (h - 1) / 2 for i in range(r)], titles, fontsize=7)
    ax.set_xticks([j * (w + pad) + (w - 1) / 2 for j in range(q)], columns, fontsize=7)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(suptitle, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _hist(ax: Any, values: np.ndarray, colour: str) -> None:
    """A 30-bin histogram as one step patch (fast), x ticks thinned, counts unlabelled."""
    from matplotlib.ticker import MaxNLocator

    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(finite, bins=30, range=(lo, hi))
    ax.stairs(counts, edges, fill=True, color=colour)
    ax.set_yticks([])
    ax.xaxis.set_major_locator(MaxNLocator(3))


def histogram_figure(
    path: Path, name: str, post: SitePosterior, dims: list[int], titles: list[str]
) -> Path:
    """Histograms of q's location (on circles for angles) and spread per dimension."""
    rows, cols = 1 + (post.spread is not None), len(dims)
    fig = new_figure(figsize=(1.8 * cols + 0.8, 1.9 * rows + 0.9))
    mean = post.mean.numpy()
    what = post.mean_name
    for j, d in enumerate(dims):
        title = titles[j]
        if post.zero_share is not None:
            title += f"\n{100 * float(post.zero_share[d]):.0f}% exact zeros"
        if post.circular:
            ax = fig.add_subplot(rows, cols, j + 1, projection="polar")
            bins = np.linspace(-math.pi, math.pi, 25)
            counts, _ = np.histogram(mean[:, d], bins=bins)
            ax.bar(bins[:-1], counts, width=np.diff(bins), align="edge", edgecolor="white")
            ax.set_yticklabels([])
        else:
            ax = fig.add_subplot(rows, cols, j + 1)
            _hist(ax, mean[:, d], "tab:blue")
            if j == 0:
                ax.set_ylabel(what, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_title(title, fontsize=7)
        if post.spread is not None:
            ax = fig.add_subplot(rows, cols, cols + j + 1)
            _hist(ax, post.spread.numpy()[:, d], "tab:orange")
            ax.tick_params(labelsize=6)
            if j == 0:
                ax.set_ylabel(post.spread_name, fontsize=8)
    shown = "" if len(dims) == mean.shape[1] else f" ({len(dims)} of {mean.shape[1]}, by KL)"
    spread = f" (top) and {post.spread_name} (bottom)" if post.spread is not None else ""
    fig.suptitle(
        f"q({name} | x) over {len(mean)} test points: {what}{spread} per dimension{shown}",
        fontsize=9,
    )
    height = 1.9 * rows + 0.9
    fig.subplots_adjust(
        left=0.6 / (1.8 * cols + 0.8), right=0.98, bottom=0.35 / height, top=1 - 0.75 / height,
        wspace=0.25, hspace=0.75,
    )  # fmt: skip
    fig.savefig(path, dpi=100)
    return path


def kl_figure(path: Path, kl: dict[str, SiteKL], zero_share: dict[str, torch.Tensor]) -> Path:
    """KL per dimension as bars, one panel per latent site (a hierarchy: one per layer)."""
    fig = new_figure(figsize=(9.0, 2.5 * len(kl) + 0.3))
    for i, (name, s) in enumerate(kl.items()):
        ax = fig.add_subplot(len(kl), 1, i + 1)
        values = s.ranking
        if values is None:
            how = "analytic" if s.analytic else "Monte Carlo"
            ax.bar([0], [s.total], width=0.5, color="tab:blue", label="test split")
            if s.history_total is not None:
                ax.plot([0], [s.history_total], "k.", ms=5, label="validation, last epoch")
            ax.set_xlim(-1.5, 1.5)
            ax.set_xticks([0], [f"{name}, whole site ({how})"])
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            ax.set_title(f"{name}: KL {s.total:.3g} nats per point (test split)", fontsize=9)
        else:
            dims = np.arange(len(values))
            dead = inactive_dims(values).numpy()
            src = "test split" if s.per_dim is not None else "validation split, last epoch"
            ax.bar(dims, values.numpy(), color=np.where(dead, "0.7", "tab:blue"), label=src)
            if s.per_dim is not None and s.history is not None:
                ax.plot(dims, s.history.numpy(), "k.", ms=5, label="validation, last epoch")
            ax.axhline(INACTIVE_KL, color="tab:red", ls="--", lw=0.8, label=f"{INACTIVE_KL} nats")
            ax.set_xticks(dims if len(dims) <= 40 else dims[:: len(dims) // 20])
            ax.set_xlabel(f"dimension of {name}", fontsize=8)
            ax.set_ylabel("KL, nats per point", fontsize=8)
            zeros = ""
            if name in zero_share:
                zeros = f"; {100 * float(zero_share[name].mean()):.0f}% of codes exactly 0"
                for d, share in zip(dims, zero_share[name].tolist()):
                    ax.annotate(
                        f"{100 * share:.0f}% 0",
                        (d, float(values[d])),
                        fontsize=6,
                        ha="center",
                        va="bottom",
                        xytext=(0, 2),
                        textcoords="offset points",
                    )
            ax.set_title(
                f"{name}: KL {float(values.sum()):.3g} nats, {int((~dead).sum())} of {len(dims)} "
                f"dimensions at or above {INACTIVE_KL} (grey: inactive){zeros}",
                fontsize=9,
            )
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def read_history(run_dir: str | Path) -> list[dict[str, float]]:
    """``run_dir/history.csv`` as rows of floats (none without the file)."""
    path = Path(run_dir) / "history.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _check_which(which: Iterable[str]) -> tuple[str, ...]:
    which = tuple(which)
    if not which or any(w not in LATENT_FIGURES for w in which):
        raise ConfigError(f"figures must be some of {list(LATENT_FIGURES)}, got {list(which)}")
    return which


@torch.no_grad()
def write_latent_figures(
    fig_dir: str | Path,
    view: LatentView,
    history: list[dict[str, float]] | None = None,
    which: Iterable[str] = LATENT_FIGURES,
    quantiles: Iterable[float] = TRAVERSAL_QUANTILES,
    progress: bool = False,
    bar: Any = None,
) -> LatentFigures:
    """Write ``traversals_<site>.png``, ``posterior_<site>.png`` and ``kl_per_dimension.png``
    (those in ``which``) into ``fig_dir``, and return them with their numbers.

    Traversal rows and histogram panels are ordered by KL per dimension (the test split's, else
    the last ``history`` row's), most informative first; dimensions below :data:`INACTIVE_KL`
    nats are marked inactive. ``progress``: a ``"figures"`` bar over them
    (:func:`~ppl_vae.progress.progress_bar`: on a terminal only, after 2 s); ``bar``: an open
    bar to advance instead (its total is raised by the figures written here).
    """
    which = _check_which(which)
    if bar is None:
        with progress_bar(progress, 0, "figures", "figure", unit_scale=False) as own:
            return write_latent_figures(fig_dir, view, history, which, quantiles, bar=own)
    quantiles = list(quantiles)
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    module, out = view.module, LatentFigures()
    was = module.training
    module.eval()
    try:
        out.posteriors = posterior_summary(view.guide, view.x, view.fixed)
        out.kl = kl_per_dimension(view.model, view.guide, view.x)
        last = history[-1] if history else None
        for name, s in out.kl.items():
            d = s.per_dim.numel() if s.per_dim is not None else None
            if d is None and name in out.posteriors:
                d = out.posteriors[name].mean.shape[1]
            s.history = history_kl(last, name, d) if d is not None else None
            if last and f"kl_{name}" in last:
                s.history_total = float(last[f"kl_{name}"])
        bar.total = (bar.total or 0) + (
            len(view.traversable) * ("traversals" in which)
            + len(out.posteriors) * ("histograms" in which)
            + int("kl" in which and bool(out.kl))
        )
        bar.refresh()
        if "traversals" in which:
            for name, site in view.traversable.items():
                t = traverse(name, site, out.kl.get(name), quantiles)
                out.traversals[name] = t
                shown = t.images[t.rows]
                imgs = as_images(shown.reshape(-1, *shown.shape[2:]), view.image_shape)
                imgs = imgs.reshape(len(t.rows), shown.shape[1], *imgs.shape[1:])
                cols, how = _columns(t, quantiles)
                d = t.codes.shape[0]
                part = "" if len(t.rows) == d else f"; the {len(t.rows)} of {d} with the most KL"
                suptitle = (
                    f"traversals of {name}: each row sweeps one dimension over {how};\n"
                    f"{view.held}; likelihood mean; rows by KL{part}"
                )
                path = fig_dir / f"traversals_{name}.png"
                out.paths.append(traversal_figure(path, imgs, t.titles, cols, suptitle))
                bar.update()
        if "histograms" in which:
            for name, post in out.posteriors.items():
                s = out.kl.get(name)
                ranking = s.ranking if s is not None else None
                dims = _shown(ranking, post.mean.shape[1], MAX_HISTOGRAM_DIMS)
                path = fig_dir / f"posterior_{name}.png"
                titles = row_titles(name, dims, ranking)
                out.paths.append(histogram_figure(path, name, post, dims, titles))
                bar.update()
        if "kl" in which and out.kl:
            zeros = {k: p.zero_share for k, p in out.posteriors.items() if p.zero_share is not None}
            out.paths.append(kl_figure(fig_dir / "kl_per_dimension.png", out.kl, zeros))
            bar.update()
    finally:
        module.train(was)
    return out


def plot_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    which: Iterable[str] = LATENT_FIGURES,
    point: int = 0,
    device: str = "auto",
    progress: bool = False,
) -> LatentFigures:
    """Reopen a run directory of any kind (:func:`~ppl_vae.runs.reopen.load_run`, the weights
    it evaluated) and write its latent figures into ``out`` (default ``run_dir/figures``),
    without training; ``point`` is the test point whose posterior mean a traversal holds;
    ``progress``: a bar over the figures (on a terminal only, after 2 s)."""
    import pyro

    from .runs.reopen import load_run
    from .training.setup import prepare_data

    which = _check_which(which)
    run = load_run(run_dir, device=device)
    fig_dir = Path(out) if out is not None else run.run_dir / "figures"
    shape = run.dataset.image_shape
    with pyro.settings.context(module_local_params=True):
        if run.kind == "m2":
            assert run.test_x is not None
            x = run.test_x
            view = m2_view(run.model, x, run.model.predict(x), shape, point)
        else:
            cfg = run.config
            x = prepare_data(run.dataset, run.model, cfg.binarize, cfg.seed)[2]
            if run.kind == "vae":
                view = vae_view(run.model, x, shape, point)
            else:
                view = pair_view(run.model, x, shape, point)
        history = read_history(run.run_dir)
        return write_latent_figures(fig_dir, view, history, which, progress=progress)
