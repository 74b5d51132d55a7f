r"""Inference: the estimators (name -> Pyro ELBO), the VAE's fused fast path, and scoring
(per-point ELBO and importance-sampled :math:`\log p(x)`)."""
