r"""Latent diagnostics per epoch, for every model kind: KL per latent dimension, the
reconstruction term, active units, and a warning when units collapse.

On the validation split, with :math:`z \sim q(z \mid x)` drawn by the guide and every site of the
model replayed on it, for each latent site :math:`s` of the guide:

.. math:: \mathrm{KL}_{s,d} = \frac1N \sum_{n} \mathrm{KL}\big(q(z_{s,d} \mid \cdot)\,\|\,
    p(z_{s,d} \mid \mathrm{pa}_s)\big), \qquad
    \mathrm{AU}_s = \#\{d : \operatorname{Cov}_x\big(\mathbb{E}_q[z_{s,d} \mid x]\big) > 0.01\}

(the KL analytic where :func:`pyro.distributions.kl.kl_divergence` has a closed form for the
pair, per dimension of the event; else the one-sample Monte Carlo estimate
:math:`\log q(z) - \log p(z)` of the draw, for the whole site), and the reconstruction term
:math:`\frac1N\sum_n \log p(x_n \mid z_n)` of the observed site. Active units follow Burda et al.
(2016). :math:`\mathbb{E}_q[z_s \mid x]` is the mean over the guide's *other* draws too (for a
site below the top of a hierarchy, q(z_s | x, z_parents) varies with the parents' draw): with
:math:`m^{(t)}(x)` the site distribution's ``mean`` in guide trace :math:`t` (the draw where it
has none, e.g. a flow posterior) and :math:`S` = :data:`MEAN_DRAWS` traces,

.. math:: \widehat{\operatorname{Cov}}_x = \operatorname{Var}_x\big(\bar m(x)\big)
    - \frac1S\, \overline{\widehat{\operatorname{Var}}_t\big(m^{(t)}(x)\big)},

the variance over x of the average, less its expected Monte Carlo part (unbiased for
:math:`\operatorname{Cov}_x(\mathbb{E}_q[z_s \mid x])`; clipped at 0). Where two traces give
the same means (every site's mean is a function of x alone: the one-layer VAE) the first trace's
are exact and no more are drawn.

The history gets ``recon``, ``kl`` (the sum over sites), ``kl_<site>``, ``active_<site>`` and
``kl_<site>_<d>`` per dimension. All draws happen with the random streams saved and restored, so
measuring does not change the training trajectory (and a resumed run equals an uninterrupted
one). After the KL warm-up, when a site has inactive units, or a total KL below ``0.01`` nats,
for three epochs in a row, the run warns once (:class:`LatentCollapseWarning`), naming the
epochs, the dimensions and what to try.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import Independent

from .callbacks import Callback

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["ACTIVE_THRESHOLD", "LatentCollapseWarning", "LatentDiagnostics", "latent_terms"]

#: Burda et al.'s threshold on Cov_x(E_q[z_d | x]).
ACTIVE_THRESHOLD = 0.01
#: Guide traces averaged for E_q[z | x] where one trace's means are not exact.
MEAN_DRAWS = 8


class LatentCollapseWarning(UserWarning):
    """Latent units are inactive, or the KL term is near zero (posterior collapse)."""


def _event_parts(d: Any) -> tuple[Any, int]:
    """The distribution under ``to_event``/``expand``/``mask`` wrappers and its event dims."""
    event_dims = 0
    while True:
        if isinstance(d, Independent):
            event_dims += d.reinterpreted_batch_ndims
            d = d.base_dist
        elif isinstance(d, ExpandedDistribution | MaskedDistribution):
            d = d.base_dist
        else:
            return d, event_dims


def _posterior_mean(q: Any, value: torch.Tensor) -> torch.Tensor:
    try:
        m = q.mean
    except NotImplementedError:
        return value
    if m.shape != value.shape or not bool(torch.isfinite(m).all()):
        return value
    return m


def _trace_means(trace: Any, n: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, g in trace.nodes.items():
        if g["type"] == "sample" and not g["is_observed"] and g["value"].shape[:1] == (n,):
            out[name] = _posterior_mean(g["fn"], g["value"]).reshape(n, -1).double()
    return out


def _mean_variance(guide: Any, x: torch.Tensor, first: Any) -> dict[str, torch.Tensor]:
    """The estimate of Cov_x(E_q[z_s | x]) per latent site ``(D_s,)`` of the module docstring:
    one trace's means where they are exact, else :data:`MEAN_DRAWS` traces' with the Monte
    Carlo part removed."""
    n = x.shape[0]

    def var_x(m: torch.Tensor) -> torch.Tensor:
        return m.var(0, unbiased=True) if n > 1 else torch.zeros(m.shape[1], dtype=m.dtype)

    one = _trace_means(first, n)
    two = _trace_means(prune_subsample_sites(poutine.trace(guide).get_trace(x)), n)
    if all(torch.equal(one[k], two[k]) for k in one):
        return {k: var_x(v) for k, v in one.items()}
    sums = {k: one[k] + two[k] for k in one}
    squares = {k: one[k] ** 2 + two[k] ** 2 for k in one}
    for _ in range(MEAN_DRAWS - 2):
        more = _trace_means(prune_subsample_sites(poutine.trace(guide).get_trace(x)), n)
        sums = {k: sums[k] + more[k] for k in sums}
        squares = {k: squares[k] + more[k] ** 2 for k in squares}
    s = MEAN_DRAWS
    out = {}
    for k, total in sums.items():
        mean = total / s
        within = (squares[k] - s * mean**2).clamp_min(0) / (s - 1)  # per point, unbiased
        out[k] = (var_x(mean) - within.mean(0) / s).clamp_min(0)
    return out


def _kl_per_dim(q: Any, p: Any, value: torch.Tensor, n: int) -> tuple[torch.Tensor, bool]:
    """Mean KL over the ``n`` points: ``(D,)`` per flattened event dimension where the closed
    form is elementwise, ``(1,)`` for the whole site where it is per point (a categorical), and
    the one-sample Monte Carlo estimate ``(1,)`` where no closed form is registered; with
    whether it is analytic."""
    qb, _ = _event_parts(q)
    pb, _ = _event_parts(p)
    try:
        kl = kl_divergence(qb, pb)
    except NotImplementedError:
        kl = None
    if kl is not None and kl.numel() in (value.numel(), n):
        return kl.reshape(n, -1).mean(0), True
    mc = q.log_prob(value) - p.log_prob(value)
    return mc.reshape(n).mean(0).reshape(1), False


@torch.no_grad()
def latent_terms(model: Any, guide: Any, x: torch.Tensor) -> dict[str, Any]:
    """The terms of the module docstring on the batch ``x`` ``(N, ...)``.

    Returns:
        ``{"recon": float, "sites": {name: {"kl_per_dim": (D,), "analytic": bool,
        "mean_var": (D,)}}}``.
    """
    n = x.shape[0]
    guide_trace = prune_subsample_sites(poutine.trace(guide).get_trace(x))
    model_trace = prune_subsample_sites(
        poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    )
    sites: dict[str, Any] = {}
    mean_vars = _mean_variance(guide, x, guide_trace)
    for name, g in guide_trace.nodes.items():
        if g["type"] != "sample" or g["is_observed"] or name not in model_trace.nodes:
            continue
        p = model_trace.nodes[name]["fn"]
        q, value = g["fn"], g["value"]
        if value.shape[:1] != (n,):
            continue  # a global latent (no data plate): no per-point terms
        kl, analytic = _kl_per_dim(q, p, value, n)
        var = mean_vars[name]
        sites[name] = {"kl_per_dim": kl.double().cpu(), "analytic": analytic, "mean_var": var}
    recon = 0.0
    for site in model_trace.nodes.values():
        if site["type"] == "sample" and site["is_observed"]:
            recon += float(site["fn"].log_prob(site["value"]).sum()) / n
    return {"recon": recon, "sites": sites}


class LatentDiagnostics(Callback):
    """Adds the module docstring's columns to every epoch's history row (rank 0 computes them).

    Args:
        max_points: validation points used (the first ones; all if fewer).
        warn: warn once when units collapse.
        patience: the collapse must last this many consecutive epochs (after the warm-up).
    """

    def __init__(self, max_points: int = 2000, warn: bool = True, patience: int = 3) -> None:
        self.max_points = max_points
        self.warn = warn
        self.patience = patience
        self.streak = 0
        self.warned = False
        self.kl_method: dict[str, str] = {}
        self.last_terms: dict[str, Any] = {"sites": {}}

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict[str, float]) -> None:
        kind = trainer.kind
        batch = kind.diagnostic_batch(self.max_points)
        if batch is None:
            return
        module = trainer.module
        columns = trainer.ctx.on_main(lambda: self._columns(self._measure(module, batch)))
        seconds = row.pop("seconds", None)
        row.update(columns)
        if seconds is not None:  # the epoch's time stays the last column
            row["seconds"] = seconds
        if self.warn and not self.warned and trainer.ctx.is_main:
            self._maybe_warn(trainer, epoch, row)

    @staticmethod
    def _measure(module: Any, batch: torch.Tensor) -> dict[str, Any]:
        """:func:`latent_terms` in eval mode, drawing nothing from the run's random streams."""
        was = module.training
        module.eval()
        try:
            with torch.random.fork_rng(devices=[batch.device] if batch.is_cuda else []):
                return latent_terms(module.model, module.guide, batch)
        finally:
            module.train(was)

    def on_evaluated(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """The evaluated epoch's active units and KL per site (the best validation epoch for a
        kind that evaluates it, else the last), and how each KL was computed."""
        if not trainer.history:
            return
        if not self.kl_method:  # resumed with no epoch left to train: measure once
            batch = trainer.kind.diagnostic_batch(self.max_points)
            if batch is None:
                return
            self._columns(self._measure(trainer.module, batch))
        last = trainer.history[-1]
        best = trainer.best_epoch
        if trainer.kind.restore_best and 0 < best <= len(trainer.history):
            last = trainer.history[best - 1]
        if any(f"active_{name}" not in last for name in self.kl_method):
            return  # a history written without the diagnostics
        metrics["latent"] = {
            name: {
                "active_units": int(last[f"active_{name}"]),
                "kl": last[f"kl_{name}"],
                "kl_method": method,
                "epoch": int(last["epoch"]),
            }
            for name, method in self.kl_method.items()
        }

    def _columns(self, terms: dict[str, Any]) -> dict[str, float]:
        self.last_terms = terms
        cols: dict[str, float] = {"recon": terms["recon"]}
        total = 0.0
        for name, s in terms["sites"].items():
            kl = s["kl_per_dim"]
            total += float(kl.sum())
            cols[f"kl_{name}"] = float(kl.sum())
            cols[f"active_{name}"] = float(int((s["mean_var"] > ACTIVE_THRESHOLD).sum()))
            self.kl_method[name] = "analytic" if s["analytic"] else "Monte Carlo"
            if s["analytic"]:
                for d, v in enumerate(kl.tolist()):
                    cols[f"kl_{name}_{d}"] = v
        cols["kl"] = total
        return {"recon": cols.pop("recon"), "kl": cols.pop("kl"), **cols}

    def _maybe_warn(self, trainer: Trainer, epoch: int, row: dict[str, float]) -> None:
        if epoch <= max(1.0, trainer.settings.warmup_epochs):
            return  # the KL weight is still rising
        problems = []
        for name, s in self.last_terms["sites"].items():
            dead = [str(d) for d, v in enumerate(s["mean_var"].tolist()) if v <= ACTIVE_THRESHOLD]
            kl = float(s["kl_per_dim"].sum())
            if dead:
                problems.append(
                    f"site {name!r}: {len(dead)} of {len(s['mean_var'])} units inactive "
                    f"(dimensions {', '.join(dead)})"
                )
            elif kl < ACTIVE_THRESHOLD:
                problems.append(f"site {name!r}: KL {kl:.3g} nats")
        self.streak = self.streak + 1 if problems else 0
        if self.streak >= self.patience:
            self.warned = True
            first = epoch - self.streak + 1
            warnings.warn(
                f"posterior collapse since epoch {first} (now {epoch}): {'; '.join(problems)}. "
                "Try a KL warm-up "
                "(--warmup-epochs), a lower --beta, a smaller --latent-dim, or more epochs",
                LatentCollapseWarning,
                stacklevel=2,
            )
