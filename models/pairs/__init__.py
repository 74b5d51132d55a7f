"""Shipped model/guide pairs (``--model NAME`` loads ``ppl_vae.models.pairs.NAME``).

A module here defines exactly one :class:`torch.nn.Module` subclass with Pyro programs
``model(x)`` and ``guide(x)``, trained by the engine as a user's own pair is. Its constructor
may ask for the engine's components by parameter name: ``data_shape``, ``prior`` (a built
:class:`~ppl_vae.models.priors.base.Prior`), ``likelihood`` (a built
:class:`~ppl_vae.models.likelihoods.base.Likelihood`), ``latent_dim`` and ``hidden_dims``.

Shipped: ``hierarchical`` (:class:`~ppl_vae.models.pairs.hierarchical.HierarchicalVAE`, bottom-up
inference, Burda et al. 2016) and ``ladder`` (:class:`~ppl_vae.models.pairs.ladder.LadderVAE`,
top-down inference sharing the generative path, Sønderby et al. 2016); their shared building
blocks are in :mod:`~ppl_vae.models.pairs._layers`.
"""
