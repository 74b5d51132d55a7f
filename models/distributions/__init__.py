"""Distributions, variational families and analytic KLs shared by ``models`` and ``guides``."""
