r"""A user's own model/guide pair as a model kind (``--model file.py:Class``).

Any :class:`torch.nn.Module` (normally a :class:`~pyro.nn.PyroModule`) with two Pyro programs:

- ``model(x)`` observes the batch ``x`` ``(N, *data_shape)`` under ``pyro.plate("data", N)``,
  with any number of latent sites (several layers, discrete sites for enumeration, ...);
- ``guide(x)`` samples every latent site of ``model(x)``.

It is trained on one mini-batch per step by the run's estimator,

.. math:: \mathcal{L}_t(x) = -\mathbb{E}_{q(z|x)}\Big[\log p(x \mid z)
    + \beta_t \sum_{s} \big(\log p(z_s \mid \mathrm{pa}_s) - \log q(z_s \mid \cdot)\big)\Big],

where the trainer's KL weight :math:`\beta_t` scales every latent site :math:`s` of both
programs (observed sites unscaled), so warm-up and beta mean what they mean for the VAE. The
validation metric is the one-sample ELBO per point; the test metrics are the ELBO and the
importance-sampled :math:`\log p(x)` over **all** the guide's latent sites
(:func:`ppl_vae.inference.scoring.score`). Figures: the ELBO curves, reconstructions (the observed site's
mean given guide draws) and samples (its mean given draws from the model's own prior), found
through Pyro traces, so no method beyond ``model``/``guide`` is needed.

The contract is checked once, before training: a model that observes nothing, an observed site
that is not the data, or a latent site the guide does not sample is a one-line error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites

from ..data import Dataset
from ..inference.free_bits import free_bits_loss
from ..models.errors import ConfigError
from .batched import BatchedKind

__all__ = ["ScaleLatents", "UserKind", "check_pair", "observed_site", "sample_from_model"]


class ScaleLatents(Messenger):
    """Multiply the log-density of every *latent* sample site by ``scale`` (a KL weight)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.scale * msg["scale"]


def _sample_sites(trace: Any) -> dict[str, Any]:
    trace = prune_subsample_sites(trace)
    return {n: s for n, s in trace.nodes.items() if s["type"] == "sample"}


@torch.no_grad()
def check_pair(module: Any, x: torch.Tensor) -> None:
    """Run ``guide(x)`` and ``model(x)`` once on a small batch; reject what breaks the contract."""
    name = type(module).__name__
    for attr in ("model", "guide"):
        if not callable(getattr(module, attr, None)):
            raise ConfigError(
                f"model {name} must define {attr}(x), a Pyro program; it has no callable `{attr}`"
            )
    was = module.training
    module.eval()  # no batch-norm statistics move
    try:
        # the check draws no number from the run's random streams
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            guide_trace = poutine.trace(module.guide).get_trace(x)
            model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(
                x
            )
    finally:
        module.train(was)
    guide_sites = _sample_sites(guide_trace)
    model_sites = _sample_sites(model_trace)
    observed = [n for n, s in model_sites.items() if s["is_observed"]]
    if not observed:
        raise ConfigError(f"{name}.model(x) observes nothing: it must observe x with obs=x")
    latent = {n for n, s in model_sites.items() if not s["is_observed"]}
    missing = sorted(latent - set(guide_sites))
    if missing:
        raise ConfigError(
            f"{name}.guide(x) must sample every latent site of {name}.model(x); it does not "
            f"sample {missing}"
        )
    observed_site(module, x, model_trace)


def observed_site(module: Any, x: torch.Tensor, trace: Any = None) -> str:
    """The name of the model's site that observes the data ``x``."""
    if trace is None:
        guide_trace = poutine.trace(module.guide).get_trace(x)
        trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(x)
    for n, s in _sample_sites(trace).items():
        v = s["value"]
        if s["is_observed"] and isinstance(v, torch.Tensor) and v.shape == x.shape:
            if v is x or bool(torch.equal(v, x)):
                return n
    raise ConfigError(
        f"{type(module).__name__}.model(x) has no observed site whose value is the data x "
        f"(shape {tuple(x.shape)})"
    )


class UserKind(BatchedKind):
    """A user's model/guide pair as a model kind.

    Args:
        module: the user's module with ``model(x)`` and ``guide(x)``.
        elbo: the Pyro ELBO estimator.
        cfg: the run's :class:`~ppl_vae.config.FitConfig` (batch size, evaluation settings).
        dataset: the loaded data set.
        splits: ``(train, val, test)`` tensors.
        dynamic: re-binarise every training batch.
        device: where the data live.
    """

    name = "user"
    restore_best = True

    def __init__(
        self,
        module: Any,
        elbo: Any,
        cfg: Any,
        dataset: Dataset,
        splits: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        dynamic: bool,
        device: torch.device,
    ) -> None:
        super().__init__(module, cfg, dataset, splits, dynamic, device)
        self.elbo = elbo
        check_pair(module, self.train_x[: min(8, len(self.train_x))])
        self._free_bits = free_bits_loss(cfg, module.model, module.guide, elbo)

    # -- objective ---------------------------------------------------------------------------
    def loss(self, x: torch.Tensor) -> torch.Tensor:
        if self._free_bits is not None:
            return self._free_bits(x, self._beta)
        model, guide = self.module.model, self.module.guide
        if self._beta != 1.0:
            model, guide = ScaleLatents(self._beta)(model), ScaleLatents(self._beta)(guide)
        return self.elbo.differentiable_loss(model, guide, x)

    # -- reports -----------------------------------------------------------------------------
    def evaluate(self, history: list[dict[str, float]], train_seconds: float) -> dict[str, Any]:
        cfg = self.cfg
        metrics = self.score_test(history, train_seconds)
        guide_trace = poutine.trace(self.module.guide).get_trace(self.test_x[:8])
        latent = sorted(n for n, s in _sample_sites(guide_trace).items() if not s["is_observed"])
        metrics.update(
            {
                "kind": self.name,
                "model": cfg.model,
                "latent_sites": latent,
                "estimator": cfg.estimator,
                "binarization": "dynamic" if self.dynamic else cfg.binarize,
                "num_parameters": sum(p.numel() for p in self.module.parameters()),
                "device": str(self.device),
                "data": self.dataset.describe(),
            }
        )
        return metrics

    @torch.no_grad()
    def figures(
        self, run_dir: Path, metrics: dict[str, Any], history: list[dict[str, float]]
    ) -> Sequence[Path]:
        from ..figures import _as_images, elbo_curve, image_grid
        from ..latent_figures import pair_view, write_latent_figures

        fig_dir = run_dir / "figures"
        fig_dir.mkdir(parents=True, exist_ok=True)
        paths = [elbo_curve(fig_dir / "elbo.png", history, metrics.get("test_elbo"))]
        was = self.module.training
        self.module.eval()
        try:
            x = self.test_x[:10]
            site = observed_site(self.module, x)
            guide_trace = poutine.trace(self.module.guide).get_trace(x)
            replayed = poutine.trace(poutine.replay(self.module.model, trace=guide_trace))
            recon = _mean(replayed.get_trace(x).nodes[site]["fn"])
            prior = poutine.trace(self.module.model).get_trace(self.test_x[:16])
            samples = _mean(prior.nodes[site]["fn"])
        except (NotImplementedError, ConfigError, RuntimeError, ValueError):
            return paths  # a likelihood without a mean: the curves alone
        finally:
            self.module.train(was)
        shape = self.dataset.image_shape
        paths.append(
            image_grid(
                fig_dir / "reconstructions.png",
                [_as_images(x, shape), _as_images(recon, shape)],
                ["test points", f"mean of {site!r} given z ~ q(z|x)"],
            )
        )
        paths.append(
            image_grid(
                fig_dir / "samples.png",
                [_as_images(samples, shape)],
                suptitle=f"mean of {site!r} given latents drawn from the model",
            )
        )
        view = pair_view(self.module, self.test_x, shape)
        paths += write_latent_figures(fig_dir, view, history, progress=self.progress).paths
        return paths


def _mean(fn: Any) -> torch.Tensor:
    m = fn.mean
    if not bool(torch.isfinite(m).all()):
        raise ValueError("non-finite mean")
    return m


@torch.no_grad()
def sample_from_model(module: Any, like: torch.Tensor, n: int, draw: bool = False) -> torch.Tensor:
    """``n`` samples of the data from the model's own prior: every latent site drawn from the
    model, the observed site's mean (or a draw from it with ``draw``), ``(n, *data_shape)``.

    ``like`` is one data point ``(1, *data_shape)`` that sets the batch size and shape of the
    model's data plate; its values are not observed.
    """
    x = like[:1].expand(n, *like.shape[1:])
    site = observed_site(module, x.clone())
    trace = poutine.trace(poutine.uncondition(module.model)).get_trace(x)
    node = trace.nodes[site]
    return node["value"] if draw else _mean(node["fn"])
