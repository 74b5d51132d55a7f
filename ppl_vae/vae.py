r"""The VAE as a Pyro model/guide pair.

.. math:: p_\theta(x, z) = p(z)\, p_\theta(x \mid z), \qquad q_\phi(z \mid x)

``model(x)`` and ``guide(x)`` are ordinary Pyro programs with a ``pyro.plate("data")`` over the
batch (dim -1) and sample sites ``"z"`` and ``"x"``, so every Pyro tool (``Predictive``, poutine
handlers, every ELBO) works on them unchanged. The KL weight (beta, warm-up) is a
``poutine.scale`` on the ``"z"`` site in both programs.

The assembly knows no particular prior, likelihood or network: it only uses their contracts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule, pyro_method

from .components import build as build_component
from .components import resolve as resolve_component
from .guides.encoders import Encoder
from .models.distributions.family import VariationalFamily, base_distribution
from .models.errors import ConfigError
from .models.likelihoods.base import Likelihood
from .models.priors.base import Prior

NETWORKS = ("auto", "mlp", "conv")
#: Constructor arguments :func:`build_networks` fills from the model, never from user options.
ENCODER_CONTEXT = ("data_shape", "latent_dim", "family", "cond_dim")
DECODER_CONTEXT = ("in_dim", "data_shape", "params_per_element", "cond_dim")


def check_batch_shape(x: torch.Tensor, data_shape: tuple[int, ...]) -> None:
    """Reject a batch ``x`` that is not ``(N, *data_shape)``, naming both shapes."""
    if x.dim() != len(data_shape) + 1 or tuple(x.shape[1:]) != tuple(data_shape):
        raise ConfigError(
            f"data has shape {tuple(x.shape)} but the model was built for "
            f"(N, {', '.join(map(str, data_shape))})"
        )


class VAE(PyroModule):
    r"""Variational autoencoder: prior, likelihood, decoder (generative) and encoder (inference).

    Args:
        prior: :math:`p(z)`, a :class:`~ppl_vae.models.priors.base.Prior`.
        likelihood: :math:`p(x \mid \eta)`, a :class:`~ppl_vae.models.likelihoods.base.Likelihood`.
        encoder: returns :math:`q(z \mid x)`.
        decoder: maps ``prior.embed(z)`` to the likelihood's parameters.

    Attributes:
        kl_scale: weight of the ``z`` site (beta times the warm-up factor); 1 is the ELBO.
    """

    def __init__(
        self, prior: Prior, likelihood: Likelihood, encoder: Encoder, decoder: torch.nn.Module
    ) -> None:
        super().__init__()
        self.prior = prior
        self.likelihood = likelihood
        self.encoder = encoder
        self.decoder = decoder
        self.kl_scale = 1.0

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.likelihood.data_shape

    @property
    def latent_dim(self) -> int:
        return self.prior.latent_dim

    def check_input(self, x: torch.Tensor) -> None:
        """Reject data whose per-point shape is not the one the networks were built for."""
        check_batch_shape(x, self.data_shape)

    # -- the Pyro programs -----------------------------------------------------------------
    @pyro_method
    def model(self, x: torch.Tensor) -> torch.Tensor:
        r"""``z ~ p(z)``, ``x ~ p(x | decoder(embed(z)))`` inside ``plate("data")``."""
        with pyro.plate("data", x.shape[0], dim=-1):
            with poutine.scale(scale=self.kl_scale):
                z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(self.decoder(self.prior.embed(z))), obs=x)
        return z

    @pyro_method
    def guide(self, x: torch.Tensor) -> torch.Tensor:
        r"""``z ~ q(z | x)`` inside the same ``plate("data")``."""
        with pyro.plate("data", x.shape[0], dim=-1):
            q = self.encoder(x)
            with poutine.scale(scale=self.kl_scale):
                return pyro.sample("z", q)

    # -- conveniences (no Pyro state) ------------------------------------------------------
    def encode(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | x), batch shape ``(N,)``."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z) for codes ``(..., D)``."""
        return self.likelihood(self.decoder(self.prior.embed(z)))

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z], the likelihood's mean (used for figures)."""
        return self.likelihood.mean(self.decoder(self.prior.embed(z)))

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """A point summary of q(z|x): its mean where finite, else its ``loc``, else a sample."""
        q = self.encode(x)
        try:
            m = q.mean
        except NotImplementedError:
            m = None
        if m is not None and bool(torch.isfinite(m).all()):
            return m
        loc = getattr(base_distribution(q), "loc", None)  # e.g. Student-t with df <= 1
        if isinstance(loc, torch.Tensor) and loc.shape == q.batch_shape + q.event_shape:
            return loc
        return q.sample()

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Exact samples z ~ q(z|x) in eval mode (e.g. exact zeros for spike-and-slab)."""
        was_training = self.training
        self.eval()
        try:
            return self.encode(x).sample()
        finally:
            self.train(was_training)

    @torch.no_grad()
    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` codes from the prior; return ``(z, E[x | z])``."""
        z = self.prior().sample((n,))
        return z, self.decode_mean(z)


def choose_network(network: str, data_shape: tuple[int, ...]) -> str:
    """``auto`` picks the convolutional networks for images of at least 16x16, else the MLP."""
    if network not in NETWORKS:
        raise ConfigError(f"Unknown network {network!r}; expected one of {list(NETWORKS)}")
    if network == "auto":
        big_image = len(data_shape) == 3 and data_shape[1] >= 16 and data_shape[2] >= 16
        return "conv" if big_image and data_shape[1] % 4 == 0 and data_shape[2] % 4 == 0 else "mlp"
    return network


def build_prior_and_likelihood(
    data_shape: tuple[int, ...],
    prior: Any,
    likelihood: Any,
    latent_dim: int,
    prior_args: dict[str, Any] | None,
    likelihood_args: dict[str, Any] | None,
    num_levels: int | None,
    num_classes: int | None = None,
) -> tuple[Prior, Likelihood]:
    """Build and check the generative components: p(z) (validated) and p(x|.) for ``data_shape``.

    ``num_classes`` is given by models with labels (M2); a prior p(z | y) is refused without.
    """
    conditional = getattr(
        prior if isinstance(prior, torch.nn.Module) else resolve_component(prior, "prior"),
        "label_conditional",
        False,
    )
    if conditional and num_classes is None:
        name = prior if isinstance(prior, str) else type(prior).__name__
        raise ConfigError(
            f"prior {name!r} is p(z | y), conditioned on the label, so it needs a model with "
            "labels (ppl-vae ssl / fit_ssl), not this one"
        )
    context: dict[str, Any] = {"latent_dim": latent_dim}
    if num_classes is not None:
        context["num_classes"] = num_classes
    p = build_component(prior, "prior", context, dict(prior_args or {}))
    if conditional and int(getattr(p, "num_classes", -1)) != num_classes:
        raise ConfigError(
            f"prior {type(p).__name__} is built for {getattr(p, 'num_classes', None)} classes "
            f"but the data have {num_classes}"
        )
    p.validate()
    lik = build_component(
        likelihood,
        "likelihood",
        {"data_shape": data_shape, "num_levels": num_levels},
        dict(likelihood_args or {}),
    )
    if tuple(lik.data_shape) != data_shape:
        raise ConfigError(
            f"likelihood built for data shape {tuple(lik.data_shape)} but the data has {data_shape}"
        )
    return p, lik


def build_networks(
    data_shape: Sequence[int],
    latent_dim: int,
    embed_dim: int,
    family: VariationalFamily,
    params_per_element: int,
    hidden_dims: Sequence[int],
    *,
    network: str = "auto",
    encoder: Any = None,
    decoder: Any = None,
    encoder_args: dict[str, Any] | None = None,
    decoder_args: dict[str, Any] | None = None,
    cond_dim: int = 0,
) -> tuple[Encoder, torch.nn.Module]:
    r"""Build (or check) the encoder :math:`q(z \mid x[, y])` and the decoder of a model.

    The encoder is built with the context ``data_shape``, ``latent_dim``, ``family``,
    ``hidden_dims`` and ``cond_dim``; the decoder with ``in_dim=embed_dim``, ``data_shape``,
    ``params_per_element``, the hidden dims reversed and ``cond_dim``. The ``*_args`` are user
    options, checked against the constructor. An instance is used as it is, after checking that
    it fits the model.

    Args:
        data_shape: shape of one data point, ``(D,)`` or ``(C, H, W)``.
        latent_dim: D of z.
        embed_dim: width of the prior's ``embed(z)``, the decoder's input.
        family: the variational family of q(z|x) (the prior's ``guide_family()``).
        params_per_element: P, the likelihood's outputs per data element.
        hidden_dims: the encoder's hidden widths; the decoder's are these reversed.
        network: ``"mlp"``, ``"conv"`` or ``"auto"`` (see :func:`choose_network`), the
            network of an ``encoder`` or ``decoder`` left as None.
        encoder: an encoder name (``"mlp"``, ``"conv"``, ``"resnet"``), ``"file.py:Class"``,
            ``"package.module:Class"``, an :class:`~ppl_vae.guides.encoders.Encoder` subclass
            or an instance; None: from ``network``.
        decoder: likewise for the decoder
            (:class:`~ppl_vae.models.decoders.Decoder`).
        encoder_args: options for the encoder's constructor (``activation``, ``norm``, ...).
        decoder_args: options for the decoder's constructor.
        cond_dim: width of a conditioning vector for both networks (M2: the number of classes).

    Returns:
        ``(encoder, decoder)``.

    Example:
        >>> from ppl_vae.models.priors.gaussian import GaussianPrior
        >>> enc, dec = build_networks(
        ...     (64,), 2, 2, GaussianPrior(2).guide_family(), 1, (32,),
        ...     encoder_args={"activation": "softplus"},
        ... )
        >>> type(enc.trunk[1]).__name__
        'Softplus'
    """
    data_shape = tuple(int(s) for s in data_shape)
    hidden = tuple(int(h) for h in hidden_dims)
    kind = choose_network(network, data_shape)
    for part, args, reserved in (
        ("encoder", encoder_args, ENCODER_CONTEXT),
        ("decoder", decoder_args, DECODER_CONTEXT),
    ):
        fixed = sorted(set(args or {}) & set(reserved))
        if fixed:
            raise ConfigError(
                f"{part} option(s) {fixed} are set by the model (from the data, prior, likelihood "
                f"and labels); {part} options may set hidden_dims and the network's own options"
            )
    enc = build_component(
        encoder if encoder is not None else kind,
        "encoder",
        {
            "data_shape": data_shape,
            "latent_dim": latent_dim,
            "family": family,
            "hidden_dims": hidden,
            "cond_dim": cond_dim,
        },
        dict(encoder_args or {}),
    )
    dec = build_component(
        decoder if decoder is not None else kind,
        "decoder",
        {
            "in_dim": embed_dim,
            "data_shape": data_shape,
            "params_per_element": params_per_element,
            "hidden_dims": hidden[::-1],
            "cond_dim": cond_dim,
        },
        dict(decoder_args or {}),
    )
    check_encoder(enc, data_shape, latent_dim, cond_dim)
    check_decoder(dec, embed_dim, data_shape, params_per_element, cond_dim)
    return enc, dec  # type: ignore[return-value]


def check_encoder(
    encoder: torch.nn.Module, data_shape: tuple[int, ...], latent_dim: int, cond_dim: int
) -> None:
    """Reject an encoder whose ``data_shape``, ``latent_dim`` or ``cond_dim`` the model cannot use."""
    name = type(encoder).__name__
    if not isinstance(encoder, Encoder):
        raise ConfigError(
            f"encoder must be a ppl_vae.guides.encoders.Encoder, got {name} "
            "(an nn.Module without features/head)"
        )
    for attr, want in (
        ("data_shape", data_shape),
        ("latent_dim", latent_dim),
        ("cond_dim", cond_dim),
    ):
        got = getattr(encoder, attr, None)
        if got != want:
            raise ConfigError(f"encoder {name} has {attr} {got!r} but the model needs {want!r}")


@torch.no_grad()
def check_decoder(
    decoder: torch.nn.Module,
    in_dim: int,
    data_shape: tuple[int, ...],
    params_per_element: int,
    cond_dim: int,
) -> None:
    """Run ``decoder`` once on zeros ``(2, in_dim)`` and check its output is ``(2, P, *data_shape)``.

    The run is in eval mode (no dropout, no batch-statistics update) and the mode is restored.
    """
    name = type(decoder).__name__
    want = (2, params_per_element, *data_shape)
    ref = next(iter(decoder.parameters()), None)
    if ref is None:
        ref = next(iter(decoder.buffers()), torch.zeros(()))
    h = ref.new_zeros(2, in_dim)
    y = ref.new_zeros(2, cond_dim) if cond_dim else None
    was_training = decoder.training
    decoder.eval()
    try:
        out = decoder(h) if y is None else decoder(h, y)
    except ConfigError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"decoder {name} fails on features of shape (N, {in_dim})"
            + (f" and a conditioning vector (N, {cond_dim})" if cond_dim else "")
            + f": {type(e).__name__}: {first}"
        ) from None
    finally:
        decoder.train(was_training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != want:
        raise ConfigError(
            f"decoder {name} returns {got} for features of shape (2, {in_dim}) but the model "
            f"needs {want} (P={params_per_element} outputs per element of {data_shape})"
        )


def build_vae(
    data_shape: Sequence[int],
    *,
    prior: Any = "gaussian",
    likelihood: Any = "bernoulli",
    latent_dim: int = 10,
    hidden_dims: Sequence[int] = (256, 128),
    network: str = "auto",
    prior_args: dict[str, Any] | None = None,
    likelihood_args: dict[str, Any] | None = None,
    num_levels: int | None = None,
    encoder: Any = None,
    decoder: Any = None,
    encoder_args: dict[str, Any] | None = None,
    decoder_args: dict[str, Any] | None = None,
    guide_family: Any = None,
    guide_family_args: dict[str, Any] | None = None,
) -> VAE:
    """Assemble a :class:`VAE` from component specs, sized from the data shape and latent size.

    Args:
        data_shape: ``(D,)`` or ``(C, H, W)``.
        prior: a prior name (``"gaussian"``), ``"file.py:Class"``, a class or an instance.
        likelihood: likewise for the likelihood.
        latent_dim: D of z (ignored for a prior instance, which has its own).
        hidden_dims: hidden widths of encoder and decoder (mirrored in the decoder); ``()`` gives
            linear maps.
        network: ``"mlp"``, ``"conv"`` or ``"auto"``: the networks used when ``encoder`` or
            ``decoder`` is None.
        prior_args: options for the prior's constructor.
        likelihood_args: options for the likelihood's constructor.
        num_levels: quantisation levels of the data, offered to likelihoods that take it.
        encoder: an encoder name (``"mlp"``, ``"conv"``, ``"resnet"``), ``"file.py:Class"``,
            ``"package.module:Class"``, a class or an instance; None: from ``network``.
        decoder: likewise for the decoder.
        encoder_args: options for the encoder's constructor (e.g. ``{"activation": "softplus"}``).
        decoder_args: options for the decoder's constructor.
        guide_family: the variational family of q(z|x): a name (``"iaf"``, ``"normal"``),
            ``"file.py:Class"``, a class or an instance; None: the prior's ``guide_family()``.
        guide_family_args: options for the family's constructor.
    """
    data_shape = tuple(int(s) for s in data_shape)
    p, lik = build_prior_and_likelihood(
        data_shape, prior, likelihood, latent_dim, prior_args, likelihood_args, num_levels
    )
    enc, dec = build_networks(
        data_shape,
        p.latent_dim,
        p.embed_dim,
        build_family(p, guide_family, guide_family_args),
        lik.params_per_element,
        hidden_dims,
        network=network,
        encoder=encoder,
        decoder=decoder,
        encoder_args=encoder_args,
        decoder_args=decoder_args,
    )
    attach_prior(p, enc, data_shape)
    if guide_family is not None:
        check_family_fits(p, enc.family)
    return VAE(p, lik, enc, dec)


def build_family(
    prior: Prior, spec: Any = None, args: dict[str, Any] | None = None
) -> VariationalFamily:
    """q(z|x)'s family: the one ``spec`` names (built with ``latent_dim`` and ``args``), or the
    prior's own ``guide_family()`` when ``spec`` is None."""
    if spec is None:
        if args:
            raise ConfigError(f"guide_family options {sorted(args)} given without a guide_family")
        return prior.guide_family()
    family = build_component(spec, "family", {"latent_dim": prior.latent_dim}, dict(args or {}))
    if not isinstance(family, VariationalFamily):
        raise ConfigError(f"guide family must be a VariationalFamily, got {type(family).__name__}")
    return family


def check_family_fits(prior: Prior, family: VariationalFamily) -> None:
    """A chosen family must live where the prior does: refuse one whose draws leave the prior's
    support (checked on draws from the built family and the prior's support)."""
    if not prior.euclidean:
        raise ConfigError(
            f"prior {type(prior).__name__} is not a density on the real line (see its "
            f"`euclidean`), so only its own guide family fits it, not {type(family).__name__}; "
            "leave guide_family unset"
        )
    support = prior().support
    with torch.no_grad():
        params = {
            name: torch.distributions.biject_to(c)(torch.zeros(2, prior.latent_dim))
            for name, c in family.param_constraints.items()
        }
        z = family.build(**params).sample()
    if not bool(support.check(z).all()):
        raise ConfigError(
            f"guide family {type(family).__name__} draws outside the support of prior "
            f"{type(prior).__name__} ({support}); choose a family on that support or none "
            "(the prior's own)"
        )


def attach_prior(prior: Prior, encoder: torch.nn.Module, data_shape: tuple[int, ...]) -> None:
    """Hand a built prior the model's encoder and data shape, then check it again (a prior built
    from them, such as the VampPrior, can be checked only now)."""
    prior.attach(encoder=encoder, data_shape=tuple(data_shape))
    prior.validate()
