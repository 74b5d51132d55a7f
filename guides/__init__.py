r"""The inference side of a VAE, :math:`q(z \mid x)` and :math:`q(y \mid x)`: encoders, label guides.

Installed as ``ppl_vae.guides``. Nothing here imports the engine (``ppl_vae`` proper).
"""
