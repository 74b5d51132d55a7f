r"""Semi-supervised learning with the M2 model (Kingma et al. 2014) as a Pyro model/guide pair.

.. math:: p_\theta(x, y, z) = p(y)\, p(z)\, p_\theta(x \mid y, z), \qquad
    q_\phi(y, z \mid x) = q_\phi(y \mid x)\, q_\phi(z \mid x, y)

``SSVAE.model(x, y=None)`` and ``SSVAE.guide(x, y=None)`` are ordinary Pyro programs with a
``pyro.plate("data")`` and sites ``"y"``, ``"z"``, ``"x"``; labelled points observe ``y`` (the
guide then has no ``y`` site), unlabelled ones leave it to the label guide
(:mod:`ppl_vae.guides.labels`: exact enumeration, Gumbel-softmax relaxation or score-function
samples). ``z`` has any prior of :mod:`ppl_vae.models.priors` with its own variational family, so
von Mises or spike-and-slab latents work unchanged. The decoder reads ``(embed(z), onehot(y))``
and the encoder ``(x, onehot(y))``.

**Objective** (per training point; :math:`N = N_l + N_u` labelled plus unlabelled points):

.. math:: J = \frac{1}{N}\Big[\sum_{(x, y)\,\in\,\mathcal{D}_l} -\mathcal{L}(x, y)
    + \sum_{x\,\in\,\mathcal{D}_u} -\mathcal{U}(x)\Big]
    + \alpha\,\frac{1}{N_l}\sum_{(x, y)\,\in\,\mathcal{D}_l} -\log q_\phi(y \mid x)

with :math:`\mathcal{L}(x, y)` the ELBO of a labelled point and
:math:`\mathcal{U}(x) = \mathbb{E}_{q(y|x)}[\mathcal{L}(x, y) - \log q_\phi(y \mid x)]` that of an
unlabelled one. The last term is Kingma et al.'s auxiliary classification loss: their
:math:`\alpha_\text{paper}\,\mathbb{E}_{\tilde p_l}[-\log q_\phi(y \mid x)]` added to the summed
bound with :math:`\alpha_\text{paper} = 0.1 \cdot N`; divided by :math:`N` that is the term above
with ``alpha`` :math:`= \alpha_\text{paper} / N = 0.1`, i.e. a weight of
:math:`\alpha N / N_l` on each labelled point's :math:`-\log q_\phi(y \mid x)` relative to its
ELBO. The default, ``alpha = "auto"``, is :math:`\alpha = D` for data of D dimensions
(:data:`ppl_vae.config.ALPHA_PER_DIMENSION`): the bound, and with it the signal the unlabelled
term sends to :math:`q_\phi(y \mid x)`, grows with D, and the paper's 0.1 was set on binarised
MNIST, whose bound is about 100 nats a point. Each step draws one labelled and one unlabelled
mini-batch and estimates :math:`J` without bias.

With every training example labelled (``labels="all"``) the unlabelled term vanishes and the model
is a conditional VAE (the classifier is still trained, by the auxiliary loss alone).

:func:`fit_ssl` trains it and writes a run directory; :func:`split_labelled` makes the
class-balanced labelled subset.

References:
    Kingma, D. P., Rezende, D. J., Mohamed, S. and Welling, M. (2014). Semi-supervised learning
    with deep generative models. NeurIPS.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.nn import PyroModule, pyro_method

from .components import build as build_component
from .config import SSLConfig
from .data import Dataset, load_data
from .guides.encoders import Encoder
from .guides.labels.base import LabelGuide
from .inference.estimators import log_likelihood as importance_log_likelihood
from .inference.scoring import log_weights
from .kinds.m2 import Cycler, M2Kind, labelled_accuracy
from .models.errors import ConfigError
from .models.likelihoods.base import Likelihood
from .models.priors.base import Prior
from .training import Callback, Settings, Trainer, distributed
from .training import checkpoint as ckpt
from .training.diagnostics import LatentDiagnostics
from .training.optim import make_adam
from .training.rundir import load_resume_state, prepare_run_dir, resolve_config
from .training.setup import initialize_from_data, prepare_data, resolve_device
from .training.trainer import state_copy
from .vae import (
    attach_prior,
    build_family,
    build_networks,
    build_prior_and_likelihood,
    check_batch_shape,
    check_family_fits,
    choose_network,
)

__all__ = [
    "SSVAE",
    "SSLBuild",
    "SSLConfig",
    "SSLResult",
    "build_ssl_run",
    "build_ssvae",
    "choose_ssl_network",
    "fit_ssl",
    "split_labelled",
]

SSL_RUN_FILES = ("baseline_history.csv", ckpt.BEST)

#: The most pixels of a one-channel image for which M2's ``auto`` picks the MLP (28 x 28).
MLP_MAX_PIXELS = 28 * 28


def choose_ssl_network(network: str, data_shape: tuple[int, ...]) -> str:
    """M2's ``auto``: the MLP for one-channel images of at most :data:`MLP_MAX_PIXELS` pixels,
    otherwise :func:`~ppl_vae.vae.choose_network`'s rule (conv for images of 16x16 and more).

    The decoder runs once per class for each unlabelled point, so a convolutional decoder costs
    M2 K times what it costs a VAE. On real one-channel 28x28 images (3,000 Fashion-MNIST
    images, 100 labels, 50 epochs, tuning seeds 10-12; ``benchmarks/ssl_defaults.py --tune
    network --datasets fashion28``) the convolutional networks' best validation accuracy was
    0.008 +- 0.005 above the MLP's (paired, mean +- standard error), within two standard
    errors, at 5.4x the time per epoch: the cheaper network wins by the rule the other defaults
    follow. Colour images (SVHN's 3x32x32) and larger ones were not measured and keep conv.
    """
    if network == "auto" and len(data_shape) == 3 and data_shape[0] == 1:
        if data_shape[1] * data_shape[2] <= MLP_MAX_PIXELS:
            return "mlp"
    return choose_network(network, data_shape)


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# the labelled subset
# ---------------------------------------------------------------------------------------------


def split_labelled(
    y: torch.Tensor | np.ndarray, num_labels: int, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no mutate block
    r"""A class-balanced labelled subset of the training points, fixed by ``seed``.

    Every class gets :math:`\lfloor n / K \rfloor` labels and :math:`n \bmod K` classes, drawn by
    ``seed``, one more; a class with too few examples gives its share to the others (as evenly
    as possible). Within class :math:`k` the labelled points are the first ones of a
    permutation drawn from ``(seed, k)`` alone, so for one seed a larger ``num_labels`` keeps every
    point a smaller one chose (when the per-class counts grow).

    Args:
        y: training labels ``(N,)`` in ``[0, num_classes)``.
        num_labels: n, how many points keep their label.
        num_classes: K.
        seed: fixes the choice.

    Returns:
        ``(labelled, unlabelled)``: sorted, disjoint index arrays covering ``range(N)``.

    Raises:
        ConfigError: ``num_labels`` larger than N or smaller than K, labels out of range, or a
            class with no training example.
    """
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    n = len(y)
    if isinstance(num_labels, bool) or not isinstance(num_labels, int | np.integer):
        raise ConfigError(f"`labels` must be an integer, got {num_labels!r}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(
            f"training labels must be in [0, {num_classes}), got values in "
            f"[{int(y.min())}, {int(y.max())}]"
        )
    if num_labels > n:
        raise ConfigError(
            f"`labels` must be at most the number of training points ({n}), got {num_labels}"
        )
    if num_labels < num_classes:
        raise ConfigError(
            f"`labels` must be at least the number of classes ({num_classes}) so that every "
            f"class has a labelled example, got {num_labels}"
        )
    counts = np.bincount(y.astype(np.int64), minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise ConfigError(
            f"class(es) {missing.tolist()} have no training example, so they cannot be labelled; "
            f"training examples per class: {counts.tolist()}"
        )
    rng = np.random.default_rng([seed, 0])
    quota = np.zeros(num_classes, dtype=np.int64)
    remaining = int(num_labels)
    while remaining > 0:
        open_classes = np.flatnonzero(quota < counts)
        share = remaining // len(open_classes)
        if share == 0:
            chosen = rng.choice(open_classes, size=remaining, replace=False)
            quota[chosen] += 1
            remaining = 0
        else:
            add = np.minimum(share, counts[open_classes] - quota[open_classes])
            quota[open_classes] += add
            remaining -= int(add.sum())
    parts = []
    for k in range(num_classes):
        idx = np.flatnonzero(y == k)
        parts.append(np.random.default_rng([seed, 1, k]).permutation(idx)[: quota[k]])
    labelled = np.sort(np.concatenate(parts))
    unlabelled = np.setdiff1d(np.arange(n), labelled)
    return labelled, unlabelled


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------


class SSVAE(PyroModule):
    r"""The M2 semi-supervised VAE: a Pyro model/guide pair with sites ``y``, ``z``, ``x``.

    .. math:: p_\theta(x, y, z) = \mathrm{Cat}(y;\,\pi)\, p(z)\,
        p_\theta(x \mid \mathrm{dec}(\mathrm{embed}(z), y)), \qquad
        q_\phi(y, z \mid x) = q_\phi(y \mid x)\, q_\phi(z \mid x, y)

    Args:
        prior: :math:`p(z)`.
        likelihood: :math:`p(x \mid \eta)`.
        encoder: :math:`q(z \mid x, y)`, built with ``cond_dim = num_classes``.
        decoder: maps ``(prior.embed(z), onehot(y))`` to the likelihood's parameters, built with
            ``cond_dim = num_classes``.
        label_guide: :math:`q(y \mid x)` and the strategy for unobserved labels.
        class_probs: :math:`\pi`, ``(K,)``; ``None`` for uniform.
    """

    def __init__(
        self,
        prior: Prior,
        likelihood: Likelihood,
        encoder: Encoder,
        decoder: torch.nn.Module,
        label_guide: LabelGuide,
        class_probs: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        k = label_guide.num_classes
        for name, module in (("encoder", encoder), ("decoder", decoder)):
            if getattr(module, "cond_dim", None) != k:
                raise ConfigError(
                    f"the {name} must be built with cond_dim={k} (one-hot labels), got "
                    f"cond_dim={getattr(module, 'cond_dim', None)}"
                )
        self.prior = prior
        self.likelihood = likelihood
        self.encoder = encoder
        self.decoder = decoder
        self.label_guide = label_guide
        probs = torch.full((k,), 1.0 / k) if class_probs is None else torch.as_tensor(class_probs)
        if probs.shape != (k,) or not bool((probs > 0).all()):
            raise ConfigError(f"`class_probs` must be {k} positive numbers, got {probs.tolist()}")
        self.register_buffer("class_logits", (probs / probs.sum()).log().float())

    @property
    def num_classes(self) -> int:
        return self.label_guide.num_classes

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.likelihood.data_shape

    def check_input(self, x: torch.Tensor) -> None:  # pragma: no mutate block
        """Reject data whose per-point shape is not the one the networks were built for."""
        check_batch_shape(x, self.data_shape)

    def one_hot(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Class indices ``(N,)`` -> one-hot ``(N, K)`` in ``like``'s dtype, range-checked."""
        if y.dtype in (torch.float16, torch.float32, torch.float64, torch.bool):
            raise ConfigError(f"labels must be integer class indices, got dtype {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ConfigError(
                f"labels must be in [0, {self.num_classes}), got values in "
                f"[{int(y.min())}, {int(y.max())}]"
            )
        return F.one_hot(y.long(), self.num_classes).to(like.dtype)

    # -- the Pyro programs ---------------------------------------------------------------------
    @pyro_method
    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        r"""``y ~ p(y)`` (observed if given), ``z ~ p(z)``, ``x ~ p(x | dec(embed(z), y))``."""
        self.check_input(x)
        y_obs = None if y is None else self.one_hot(y, x)
        with pyro.plate("data", x.shape[0], dim=-1):
            y_val = pyro.sample("y", self.label_guide.prior(self.class_logits), obs=y_obs)
            z = pyro.sample("z", self.p_z(y_val))
            out = self.decoder(self.prior.embed(z), y_val)
            pyro.sample("x", self.likelihood(out), obs=x)
        return z

    @pyro_method
    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        r"""``y ~ q(y | x)`` by the label guide unless given, then ``z ~ q(z | x, y)``."""
        self.check_input(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            y_val = self.label_guide.sample("y", x) if y is None else self.one_hot(y, x)
            return pyro.sample("z", self.q_z(x, y_val))

    def p_z(self, y: torch.Tensor) -> dist.Distribution:
        """p(z), or p(z | y) for one-hot (or relaxed) labels ``y`` ``(..., K)`` when the prior
        is :attr:`~ppl_vae.models.priors.base.Prior.label_conditional`."""
        return self.prior(y) if self.prior.label_conditional else self.prior()

    def prior_codes(self, n: int) -> torch.Tensor:  # pragma: no mutate block
        """Codes for every class, ``(K, n, D)``: the same ``n`` draws of p(z) in every class, or
        for p(z | y) ``n`` draws of p(z | k) per class k."""
        k = self.num_classes
        if not self.prior.label_conditional:
            z = self.prior().sample((n,))
            return z.expand(k, *z.shape)
        ref = self.class_logits
        eye = torch.eye(k, dtype=ref.dtype, device=ref.device)
        return self.prior(eye).sample((n,)).transpose(0, 1)

    def q_z(self, x: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        r"""q(z | x, y) for one-hot ``y`` ``(*batch, K)`` broadcasting against ``x``'s ``(N,)``.

        The encoder's feature network runs once on ``x``; only its head sees each ``y`` (under
        enumeration ``y`` is ``(K, 1, K)`` and the result has batch shape ``(K, N)``).
        """
        enc = self.encoder
        h = enc.features(x)
        hb, yb = h.shape[:-1], y.shape[:-1]
        if hb != yb:  # (torch.broadcast_shapes is a Python function: only where needed)
            batch = torch.broadcast_shapes(hb, yb)
            h, y = h.expand(*batch, h.shape[-1]), y.expand(*batch, y.shape[-1])
        raw = enc.head(torch.cat([h, y], -1))
        return enc.family.build(**enc.family.constrain(raw, enc.latent_dim))

    # -- the auxiliary classification term as a Pyro program ------------------------------------
    @pyro_method
    def classifier_model(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> None:
        r"""Observes ``y`` under :math:`q_\phi(y \mid x)` with weight ``scale`` (Kingma et al.'s
        auxiliary loss, as Pyro's M2 example writes it): with the empty
        :meth:`classifier_guide`, any Pyro ELBO of this pair is
        :math:`\texttt{scale} \sum_i \log q_\phi(y_i \mid x_i)`."""
        with pyro.plate("data", x.shape[0], dim=-1), poutine.scale(scale=scale):
            pyro.sample("y_class", self.label_guide.dist(x), obs=y)

    def classifier_guide(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> None:
        """The classification term has no latent site: an empty guide."""

    # -- conveniences --------------------------------------------------------------------------
    def classification_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r""":math:`-\log q_\phi(y \mid x)` per point, ``(N,)``."""
        return -self.label_guide.dist(x).log_prob(y)

    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """The most probable class under q(y | x), ``(N,)``."""
        with torch.no_grad():
            was = self.training
            self.eval()
            try:
                return torch.cat(
                    [
                        self.label_guide(x[i : i + batch_size]).argmax(-1)
                        for i in range(0, len(x), batch_size)
                    ]
                )
            finally:
                self.train(was)

    def decode_mean(
        self, z: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:  # pragma: no mutate block
        """E[x | z, y] for codes ``(..., D)`` and one-hot labels ``(..., K)``."""
        return self.likelihood.mean(self.decoder(self.prior.embed(z), y))

    @torch.no_grad()
    def sample_per_class(
        self, n: int, draw: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no mutate block
        r"""``n`` codes :math:`z_j \sim p(z)`, each decoded with every class.

        Returns:
            ``(z, x)``: codes ``(n, D)`` and ``x`` ``(K, n, *data_shape)`` with ``x[k, j]`` the
            mean of :math:`p(x \mid z_j, k)` (``draw=True``: a draw from it), so a column holds
            one style in every class.
        """
        k = self.num_classes
        codes = self.prior_codes(n)  # (K, n, D)
        eye = torch.eye(k, dtype=codes.dtype, device=codes.device)
        zk = codes.reshape(k * n, *codes.shape[2:])
        yk = eye.repeat_interleave(n, dim=0)
        params = self.decoder(self.prior.embed(zk), yk)
        x = self.likelihood(params).sample() if draw else self.likelihood.mean(params)
        z = codes[0] if not self.prior.label_conditional else codes
        return z, x.reshape(k, n, *x.shape[1:])

    def posterior_mean(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A point summary of q(z | x, y) (its mean where defined, else a sample)."""
        q = self.q_z(x, self.one_hot(y, x))
        try:
            return q.mean
        except NotImplementedError:
            return q.sample()

    def elbo_per_class(
        self, x: torch.Tensor, num_samples: int = 10, batch_size: int = 256
    ) -> torch.Tensor:
        r""":math:`\mathcal{L}(x, k)` for every class k, ``(N, K)``, from ``num_samples`` z each.

        .. math:: \mathcal{L}(x, k) \approx \tfrac1S \sum_s \log
            \frac{p(x \mid k, z_s)\, p(k)\, p(z_s)}{q(z_s \mid x, k)}, \quad z_s \sim q(z \mid x, k)

        Log-densities are unscaled and exact (the guide in eval mode).
        """
        with torch.no_grad():
            return self._per_class(
                x,
                batch_size,
                lambda xb, yk: log_weights(
                    functools.partial(self.model, y=yk),
                    functools.partial(self.guide, y=yk),
                    xb,
                    num_samples,
                ).mean(0),
            )

    def _per_class(self, x: torch.Tensor, batch_size: int, fn: Any) -> torch.Tensor:
        """``fn(x_batch, y_k)`` ``(B,)`` for every class k and batch, as ``(N, K)``, in eval mode."""
        was = self.training
        self.eval()
        try:
            out = []
            for start in range(0, x.shape[0], batch_size):
                xb = x[start : start + batch_size]
                cols = [
                    fn(xb, torch.full((xb.shape[0],), k, dtype=torch.long, device=xb.device))
                    for k in range(self.num_classes)
                ]
                out.append(torch.stack(cols, -1))
            return torch.cat(out)
        finally:
            self.train(was)

    def unlabelled_elbo(
        self, x: torch.Tensor, num_samples: int = 10, per_class: torch.Tensor | None = None
    ) -> torch.Tensor:
        r""":math:`\mathcal{U}(x)` with y summed out exactly, ``(N,)``.

        .. math:: \mathcal{U}(x) = \sum_k q_\phi(k \mid x)\,
            \big[\mathcal{L}(x, k) - \log q_\phi(k \mid x)\big]
        """
        with torch.no_grad():
            if per_class is None:
                per_class = self.elbo_per_class(x, num_samples)
            was = self.training
            self.eval()
            try:
                log_q = torch.cat(
                    [
                        self.label_guide(x[i : i + 1024]).log_softmax(-1)
                        for i in range(0, len(x), 1024)
                    ]
                )
            finally:
                self.train(was)
            return (log_q.exp() * (per_class - log_q)).sum(-1)

    def log_joint_per_class(
        self, x: torch.Tensor, num_samples: int = 100, chunk_size: int = 100, batch_size: int = 256
    ) -> torch.Tensor:
        r"""Importance-sampled :math:`\log p(x, k)` for every class k, ``(N, K)``.

        .. math:: \log \hat p(x, k) = \log \tfrac1S \sum_{s=1}^S
            \frac{p(k)\, p(z_s)\, p(x \mid k, z_s)}{q(z_s \mid x, k)},
            \quad z_s \sim q(z \mid x, k)

        ``num_samples`` (S) draws per class, in vectorised chunks of ``chunk_size``; unscaled
        log-densities, the guide in eval mode. Each entry is a stochastic lower bound of
        :math:`\log p(x, k)` in expectation that tightens as S grows.
        """
        with torch.no_grad():
            return self._per_class(
                x,
                batch_size,
                lambda xb, yk: importance_log_likelihood(
                    self.model, self.guide, xb, y=yk, num_samples=num_samples, chunk_size=chunk_size
                ),
            )

    def log_likelihood(
        self, x: torch.Tensor, num_samples: int = 100, chunk_size: int = 100, batch_size: int = 256
    ) -> torch.Tensor:
        r"""Importance-sampled :math:`\log p(x)` per point with y summed out exactly, ``(N,)``.

        .. math:: \log \hat p(x) = \operatorname{logsumexp}_{k=1}^{K} \log \hat p(x, k)

        with :math:`\log \hat p(x, k)` of :meth:`log_joint_per_class` (``num_samples`` z per
        class, so :math:`K \cdot S` decoder passes per point). A stochastic lower bound of
        :math:`\log p(x)` in expectation, above the unlabelled ELBO :meth:`unlabelled_elbo`
        (in expectation), and consistent as S grows.
        """
        with torch.no_grad():
            return self.log_joint_per_class(x, num_samples, chunk_size, batch_size).logsumexp(-1)


def build_ssvae(
    data_shape: tuple[int, ...],
    num_classes: int,
    *,
    prior: Any = "gaussian",
    likelihood: Any = "bernoulli",
    label_guide: Any = "enumerate",
    latent_dim: int = 16,
    hidden_dims: tuple[int, ...] | list[int] = (256, 128),
    network: str = "auto",
    prior_args: dict[str, Any] | None = None,
    likelihood_args: dict[str, Any] | None = None,
    label_guide_args: dict[str, Any] | None = None,
    num_levels: int | None = None,
    class_probs: list[float] | torch.Tensor | None = None,
    encoder: Any = None,
    decoder: Any = None,
    encoder_args: dict[str, Any] | None = None,
    decoder_args: dict[str, Any] | None = None,
    guide_family: Any = None,
    guide_family_args: dict[str, Any] | None = None,
) -> SSVAE:  # pragma: no mutate block
    """Assemble an :class:`SSVAE` from component specs (names, ``file.py:Class``, classes).

    The encoder and decoder are those of :func:`~ppl_vae.vae.build_networks` (names, files,
    classes or instances, with options) with ``cond_dim`` for the one-hot label; the label guide gets ``data_shape``, ``num_classes``, ``hidden_dims`` and
    ``network`` unless ``label_guide_args`` sets them.
    """
    data_shape = tuple(int(s) for s in data_shape)
    hidden = tuple(int(h) for h in hidden_dims)
    network = choose_ssl_network(network, data_shape)
    p, lik = build_prior_and_likelihood(
        data_shape,
        prior,
        likelihood,
        latent_dim,
        prior_args,
        likelihood_args,
        num_levels,
        num_classes=num_classes,
    )
    guide = build_component(
        label_guide,
        "label_guide",
        {
            "data_shape": data_shape,
            "num_classes": num_classes,
            "hidden_dims": hidden,
            "network": network,
        },
        dict(label_guide_args or {}),
    )
    if guide.num_classes != num_classes:
        raise ConfigError(
            f"label guide built for {guide.num_classes} classes but the data have {num_classes}"
        )
    enc, dec = build_networks(
        data_shape,
        p.latent_dim,
        p.embed_dim,
        build_family(p, guide_family, guide_family_args),
        lik.params_per_element,
        hidden,
        network=network,
        encoder=encoder,
        decoder=decoder,
        encoder_args=encoder_args,
        decoder_args=decoder_args,
        cond_dim=num_classes,
    )
    attach_prior(p, enc, data_shape)
    if guide_family is not None:
        check_family_fits(p, enc.family)
    probs = None if class_probs is None or len(class_probs) == 0 else torch.as_tensor(class_probs)
    return SSVAE(p, lik, enc, dec, guide, probs)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


@dataclass
class SSLResult:  # pragma: no mutate block
    """What :func:`fit_ssl` returns."""

    model: SSVAE
    config: SSLConfig
    dataset: Dataset
    history: list[dict[str, float]]
    metrics: dict[str, Any]
    labelled: np.ndarray
    unlabelled: np.ndarray
    run_dir: Path | None = None
    baseline: LabelGuide | None = None
    baseline_history: list[dict[str, float]] = field(default_factory=list)


def auto_likelihood(ds: Dataset) -> str:  # pragma: no mutate block
    """The ``likelihood="auto"`` choice for a data set (see :class:`SSLConfig`)."""
    if ds.num_levels is not None and ds.num_levels > 2:
        return "discretized-logistic"
    if ds.num_levels == 2:
        return "bernoulli"
    x = ds.train_x
    if bool(((x >= 0) & (x <= 1)).all()):
        return "continuous-bernoulli"
    return "normal"


def _check_labels(ds: Dataset, num_classes: int) -> None:  # pragma: no mutate block
    for split in ("train", "val", "test"):
        y = getattr(ds, f"{split}_y")
        if y is None:
            raise ConfigError(
                f"semi-supervised learning needs labels, but the {split} split of "
                f"{ds.name!r} has none (pass a .npz with 'y', or labels= for arrays)"
            )
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ConfigError(f"{split} labels must be integers, got dtype {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            bad = y[(y < 0) | (y >= num_classes)]
            raise ConfigError(
                f"{split} labels must be in [0, {num_classes}) (num_classes={num_classes}), got "
                f"{bad.numel()} outside, e.g. {int(bad[0])}"
            )
        if len(y) != len(getattr(ds, f"{split}_x")):
            raise ConfigError(
                f"{split} split has {len(getattr(ds, f'{split}_x'))} points but {len(y)} labels"
            )
    if ds.val_y is not None and len(ds.val_y) == 0:
        raise ConfigError(
            "the validation split is empty: it chooses the checkpoint; raise `val_fraction`"
        )


@dataclass
class SSLBuild:  # pragma: no mutate block
    """What :func:`build_ssl_run` returns: everything an M2 run is built from.

    Attributes:
        config: the resolved config (``likelihood`` and ``num_classes`` set).
        dataset: the data set, on the device.
        model: the :class:`SSVAE` with freshly initialised weights, on the device.
        labelled: indices of the labelled training points; ``unlabelled`` the others.
        splits: ``(train, val, test)`` data after :func:`~ppl_vae.training.setup.prepare_data`
            (evaluation data binarised once where the run binarises dynamically).
        dynamic: whether training batches are binarised afresh at every step.
    """

    config: SSLConfig
    dataset: Dataset
    model: SSVAE
    labelled: np.ndarray
    unlabelled: np.ndarray
    splits: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    dynamic: bool


def build_ssl_run(
    cfg: SSLConfig,
    *,
    dataset: Dataset | None = None,
    device: torch.device | str = "cpu",
    download: bool | None = None,
    saved: bool = False,
) -> SSLBuild:  # pragma: no mutate block
    r"""Rebuild what an M2 run is made of from its config: data, labelled subset and model.

    This is the one way :func:`fit_ssl` and :func:`ppl_vae.runs.reopen.load_run` build an M2 run, so
    a run directory reopens exactly as it was trained: the same split (``cfg.split_seed``),
    the same class-balanced labelled subset, the same networks. It seeds Pyro's (torch, NumPy,
    Python) random states with ``cfg.seed`` first and draws from them only to initialise the
    networks; components that initialise from the data are left to the caller (fresh runs only).

    Args:
        cfg: the run's :class:`SSLConfig` (``likelihood="auto"`` and ``num_classes=None`` are
            resolved here).
        dataset: an already-loaded data set instead of ``cfg.data``.
        device: where the data and the model go.
        download: overrides ``cfg.download`` (reopening a run never downloads: ``False``).
        saved: ``cfg`` was read from a run directory (reopened or resumed). The network a run
            built is recorded in its config (``network = "auto"`` is resolved here, by
            :func:`choose_ssl_network`); a saved ``"auto"`` was written before it was, when
            M2's ``auto`` followed :func:`~ppl_vae.vae.choose_network` alone, so that rule
            rebuilds it.

    Raises:
        ConfigError: data without labels, too few classes, bad labels, a labelled subset that
            leaves nothing unlabelled, ``class_probs`` of the wrong length.
    """
    device = torch.device(device)
    pyro.set_rng_seed(cfg.seed)
    if cfg.features is not None:
        if dataset is not None:
            raise ConfigError("`features` brings its own data: pass no dataset= with it")
        from .runs.features import feature_dataset

        dataset = feature_dataset(cfg.features, cfg.features_mode, seed=cfg.split_seed)
        pyro.set_rng_seed(cfg.seed)  # reopening the features run drew nothing; be sure
    if dataset is None:
        dataset = load_data(
            cfg.data,
            test_data=cfg.test_data,
            root=cfg.data_root,
            download=cfg.download if download is None else download,
            binarize="static" if cfg.binarize == "static" else "none",
            val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction,
            max_train=cfg.max_train,
            seed=cfg.split_seed,
            svhn_extra=cfg.svhn_extra,
        )
    elif cfg.svhn_extra:
        raise ConfigError(
            "`svhn_extra` applies when the data are loaded by name, not to a dataset="
        )
    if dataset.train_y is None:
        raise ConfigError(
            f"semi-supervised learning needs labels, but the training split of {dataset.name!r} "
            "has none (pass a .npz with 'y', or labels= for arrays)"
        )
    num_classes = cfg.num_classes if cfg.num_classes is not None else dataset.num_classes
    if num_classes is None or num_classes < 2:
        raise ConfigError(
            f"semi-supervised learning needs at least 2 classes, got num_classes={num_classes}"
        )
    _check_labels(dataset, num_classes)
    assert dataset.train_y is not None and dataset.val_y is not None and dataset.test_y is not None
    n_train = len(dataset.train_x)
    if cfg.labels == "all":
        labelled = np.arange(n_train)
        unlabelled = np.arange(0)
    else:
        labelled, unlabelled = split_labelled(
            dataset.train_y, int(cfg.labels), num_classes, cfg.split_seed
        )
        if len(unlabelled) == 0:
            raise ConfigError(
                f"`labels`={cfg.labels} labels every training point, which leaves the unlabelled "
                "set empty, but semi-supervised training needs unlabelled data: pass fewer "
                "labels, or labels='all' (--labels all) for a conditional VAE"
            )
    if cfg.class_probs and len(cfg.class_probs) != num_classes:
        raise ConfigError(
            f"`class_probs` must have num_classes={num_classes} entries, got {len(cfg.class_probs)}"
        )
    likelihood = auto_likelihood(dataset) if cfg.likelihood == "auto" else cfg.likelihood
    pick = choose_network if saved else choose_ssl_network
    network = pick(cfg.network, dataset.data_shape)
    model = build_ssvae(
        dataset.data_shape,
        num_classes,
        prior=cfg.prior,
        likelihood=likelihood,
        label_guide=cfg.label_guide,
        latent_dim=cfg.latent_dim,
        hidden_dims=cfg.hidden_dims,
        network=network,
        prior_args=cfg.prior_args,
        likelihood_args=cfg.likelihood_args,
        label_guide_args=cfg.label_guide_args,
        num_levels=dataset.num_levels,
        class_probs=cfg.class_probs or None,
        encoder=cfg.encoder,
        decoder=cfg.decoder,
        encoder_args=cfg.encoder_args,
        decoder_args=cfg.decoder_args,
        guide_family=cfg.guide_family,
        guide_family_args=cfg.guide_family_args,
    )
    resolved = cfg.to_dict()
    resolved["likelihood"] = likelihood
    resolved["network"] = network
    resolved["num_classes"] = num_classes
    cfg = SSLConfig.from_dict(resolved)
    dataset = dataset.to(device)
    model.to(device)
    train, val, test, dynamic = prepare_data(dataset, model, cfg.binarize, cfg.split_seed)
    return SSLBuild(cfg, dataset, model, labelled, unlabelled, (train, val, test), dynamic)


def _open_resumed_run(
    run_dir: Path, cfg: SSLConfig, device: torch.device
) -> dict[str, Any] | None:  # pragma: no mutate block
    """The newest good checkpoint of a run being resumed (None: start again from epoch 0).

    Checks ``epochs`` against the epochs done; changes nothing in the directory (that is
    :func:`_update_resumed_run`'s, once the checkpoint has loaded into the model).
    """
    # warning: load_resume_state < _open_resumed_run < lambda < on_main < _fit_ssl < fit_ssl <
    # caller
    state = load_resume_state(run_dir, cfg.epochs, device, stacklevel=7)
    if state is not None and ("best_model" not in state or "labelled_batches" not in state):
        raise ConfigError(
            f"checkpoint in {str(run_dir)!r} is not a resumable ppl-vae ssl checkpoint "
            "(no best_model/labelled_batches: written by another command or an older version)"
        )
    return state


def _update_resumed_run(
    run_dir: Path, cfg: SSLConfig, state: dict[str, Any] | None
) -> None:  # pragma: no mutate block
    """Rank 0's writes of a resume, after the checkpoint loaded: clear leftover temporary files
    and the outputs of the last evaluation, and save a raised ``epochs`` into ``config.toml``."""
    ckpt.remove_temporaries(run_dir)
    for name in ("metrics.json", *SSL_RUN_FILES[:1]):
        (run_dir / name).unlink(missing_ok=True)
    if state is None:
        (run_dir / ckpt.BEST).unlink(missing_ok=True)
    if cfg.epochs != SSLConfig.load(run_dir / "config.toml").epochs:
        cfg.save(run_dir / "config.toml")


def fit_ssl(
    config: SSLConfig | dict[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    dataset: Dataset | None = None,
    figures: bool = True,
    callbacks: list[Callback] | None = None,
    **options: Any,
) -> SSLResult:  # pragma: no mutate block
    r"""Train the M2 semi-supervised VAE and evaluate its classifier and bound on the test split.

    Args:
        config: an :class:`SSLConfig`, a dict of its fields, or None for the defaults; keyword
            ``options`` override single fields (``labels=50``, ``label_guide="relaxed"``).
        out: run directory (``config.toml``, ``metrics.json``, ``history.csv``,
            ``checkpoint.pt`` (last epoch), ``best.pt`` (best validation accuracy), figures);
            None trains in memory only.
        resume: continue the run in ``out`` from its last checkpoint with its saved config
            (only ``epochs``, which may be raised, and ``device`` may be given). On CPU the result
            is exactly that of an uninterrupted run of the same ``epochs``: the checkpoint holds
            the model, the optimiser, the epoch, the history, the best-validation state and every
            random state (global torch/NumPy/Python, the unlabelled-order generator and the
            labelled-batch generator with its current permutation). Raising ``epochs`` continues
            the same run; schedules that depend on the total (the relaxed guide's temperature)
            then follow the new total from the resumed epoch on. The supervised baseline, trained
            after the M2 model and seeded on its own, is retrained from scratch.
        overwrite: replace an existing run in ``out``.
        quiet: no progress bar (it is also off when stderr is not a terminal).
        dataset: an already-loaded :class:`~ppl_vae.data.Dataset` instead of ``config.data``.
        figures: write figures to ``out/figures``.

    Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE > 1``) the N processes train one model
    with DistributedDataParallel, as :func:`ppl_vae.fit` does (:mod:`ppl_vae.training.distributed`):
    every rank draws the same global labelled and unlabelled batches from the shared seed and
    takes its shard of each; the whole step loss (labelled and unlabelled bounds and the
    classification term, each divided by its *global* batch size) is computed inside the DDP
    module's forward. Rank 0 alone reads and writes the run directory, measures the validation
    accuracies (so it chooses ``best.pt``; every rank receives them and keeps the same best
    weights), computes the test metrics, trains the supervised baseline and writes the figures;
    the other ranks' results carry its metrics and baseline history but ``baseline=None``. With
    one process the run is bit for bit the single-process one.

    Returns:
        An :class:`SSLResult`; the model holds the weights of the epoch with the best validation
        accuracy (ties: the later epoch), which is the one evaluated.

    Raises:
        ConfigError: bad options or data, before any training step; an existing ``out`` without
            ``resume`` or ``overwrite`` (the directory is left untouched).
        TrainingError: a non-finite loss.

    Example:
        >>> r = fit_ssl(labels=50, epochs=30, quiet=True)  # doctest: +SKIP
        >>> r.metrics["test_accuracy"]  # doctest: +SKIP
    """
    with pyro.settings.context(module_local_params=True):
        ctx = distributed.setup()
        try:
            return _fit_ssl(
                ctx, config, out, resume, overwrite, quiet, dataset, figures, callbacks, options
            )
        finally:
            distributed.teardown(ctx)


def _fit_ssl(
    ctx: distributed.Context,
    config: Any,
    out: str | Path | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    dataset: Dataset | None,
    figures: bool,
    callbacks: list[Callback] | None,
    options: dict[str, Any],
) -> SSLResult:  # pragma: no mutate block
    run_dir = Path(out) if out is not None else None
    if resume and config is not None:
        raise ConfigError(
            "resume uses the run's saved config.toml; pass config=None (only `epochs` and "
            "`device` may be given)"
        )
    cfg = resolve_config(SSLConfig, ctx, config, options, run_dir, resume)

    # -- data and every check, before anything trains or touches the run directory --------
    device = ctx.device(cfg.device) if ctx.enabled else resolve_device(cfg.device)
    built = build_ssl_run(cfg, dataset=dataset, device=device, saved=resume)
    cfg, dataset, model = built.config, built.dataset, built.model
    labelled, unlabelled, splits = built.labelled, built.unlabelled, built.splits
    if not resume:
        initialize_from_data(model, splits[0])
    kind = M2Kind(model, cfg, dataset, splits, labelled, unlabelled, built.dynamic, device)
    kind.progress = not quiet  # the figures: a bar on a terminal
    trainer = Trainer(
        kind,
        Settings(
            epochs=cfg.epochs,
            lr=cfg.lr,
            clip_norm=cfg.clip_norm,
            seed=cfg.seed,
            lr_schedule=cfg.lr_schedule,
            lr_schedule_args=cfg.lr_schedule_args,
            patience=cfg.patience,
        ),
        ctx=ctx,
        device=device,
        run_dir=run_dir,
        config=cfg.to_dict(),
        callbacks=[LatentDiagnostics(), *(callbacks or [])]
        if cfg.latent_diagnostics
        else callbacks,
        quiet=quiet,
    )
    if resume:
        assert run_dir is not None
        # Several processes: rank 0 reads the checkpoint on the CPU and hands it to every rank.
        where = torch.device("cpu") if ctx.enabled else device
        state = ctx.on_main(lambda: _open_resumed_run(run_dir, cfg, where))
        if state is not None:
            trainer.load_state(state)
        ctx.on_main(lambda: _update_resumed_run(run_dir, cfg, state))
    elif run_dir is not None:

        def start_run() -> None:
            prepare_run_dir(run_dir, resume=False, overwrite=overwrite)
            for name in SSL_RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
            cfg.save(run_dir / "config.toml")

        ctx.on_main(start_run)
    metrics = trainer.run(figures)
    return SSLResult(
        model,
        cfg,
        dataset,
        trainer.history,
        metrics,
        labelled,
        unlabelled,
        run_dir,
        kind.baseline,
        kind.baseline_history,
    )


def train_supervised(
    classifier: LabelGuide,
    x: torch.Tensor,
    y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    epochs: int,
    steps_per_epoch: int,
    batch_size: int,
    lr: float = 1e-3,
    dynamic: bool = False,
    seed: int = 0,
    patience: int | None = None,
    clip_norm: float | None = None,
) -> tuple[list[dict[str, float]], int]:  # pragma: no mutate block
    r"""The supervised baseline: train ``classifier`` on ``(x, y)`` alone by cross-entropy.

    .. math:: \min_\phi\ \tfrac{1}{N_l} \sum_{(x, y)} -\log q_\phi(y \mid x)

    It gets the semi-supervised run's budget of labelled mini-batches (``epochs`` times
    ``steps_per_epoch`` Adam steps of ``batch_size`` labelled points) and is validated once per
    epoch; it stops after ``patience`` epochs without a better validation accuracy and keeps the
    weights of its best epoch (ties: the later), as the SSVAE does.

    Returns:
        ``(history, best_epoch)``; ``classifier`` holds the best weights.
    """
    optimizer = make_adam(classifier.parameters(), lr=lr)
    batches = Cycler(len(x), batch_size, torch.Generator().manual_seed(seed + 2))
    history: list[dict[str, float]] = []
    best_acc, best_epoch, best_state = -1.0, 0, state_copy(classifier)
    classifier.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        total = 0.0
        for _ in range(steps_per_epoch):
            idx = batches.next().to(x.device)
            xb, yb = x[idx], y[idx]
            if dynamic:
                xb = torch.bernoulli(xb)
            optimizer.zero_grad(set_to_none=True)
            loss = -classifier.dist(xb).log_prob(yb).mean()
            loss.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(classifier.parameters(), clip_norm)
            optimizer.step()
            total += float(loss.detach())
        acc = labelled_accuracy(classifier, val_x, val_y)
        history.append(
            {
                "epoch": float(epoch + 1),
                "class_loss": total / steps_per_epoch,
                "labelled_accuracy": labelled_accuracy(classifier, x, y),
                "val_accuracy": acc,
                "seconds": time.perf_counter() - t0,
            }
        )
        if acc >= best_acc:
            best_acc, best_epoch, best_state = acc, epoch + 1, state_copy(classifier)
        elif patience is not None and epoch + 1 - best_epoch >= patience:
            break
    classifier.load_state_dict(best_state)
    classifier.eval()
    return history, best_epoch
