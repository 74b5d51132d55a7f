r"""The generative side of a VAE, :math:`p(x \mid z)\,p(z)`: priors, likelihoods, decoders.

Installed as ``ppl_vae.models``. Nothing here imports the engine (``ppl_vae`` proper).
"""
