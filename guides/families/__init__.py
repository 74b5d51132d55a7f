r"""Variational families of q(z|x), chosen with ``--guide-family NAME`` (default: the prior's own).

A module here defines exactly one
:class:`~ppl_vae.models.distributions.family.VariationalFamily` subclass; its constructor may
take ``latent_dim`` from the engine and options from ``--guide-family-arg KEY=VALUE``. The
encoder's head emits one block of ``latent_dim`` raw numbers per entry of the family's
``param_constraints``, and the family turns them into a distribution.
"""
