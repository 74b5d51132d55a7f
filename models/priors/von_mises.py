r"""Von Mises prior: a latent code on the torus, one angle per dimension.

The guide mirrors the prior (:class:`~ppl_vae.models.distributions.family.MirrorFamily` reads
``loc`` real and ``concentration`` positive off
:class:`~ppl_vae.models.distributions.von_mises.ReparameterizedVonMises`), so q(z|x) is a
reparameterised von Mises too: ``Trace_ELBO`` gets pathwise (implicit) gradients and
``TraceMeanField_ELBO`` the registered closed-form KL. The decoder reads
:math:`(\cos z, \sin z)`, which is continuous on the circle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pyro.distributions as dist
import torch
from matplotlib.figure import Figure
from pyro.nn import PyroParam

from ..distributions.von_mises import ReparameterizedVonMises
from ..errors import ConfigError
from .base import Prior

#: At most this many dimensions get a circular histogram.
MAX_HISTOGRAM_DIMS = 10


def _wrap(x: torch.Tensor) -> torch.Tensor:
    return torch.remainder(x + math.pi, 2.0 * math.pi) - math.pi


class VonMisesPrior(Prior):
    r"""Factorised von Mises prior on the torus :math:`[-\pi, \pi)^D`.

    .. math:: p(z) = \prod_{d=1}^{D} \frac{e^{\kappa_d \cos(z_d - \mu_d)}}{2\pi I_0(\kappa_d)}

    Args:
        latent_dim: D, the number of angles.
        concentration: :math:`\kappa > 0`, one float for every dimension or a sequence /
            tensor of shape ``(D,)``. Small values approach the uniform distribution on the
            torus.
        learn_loc: learn :math:`\mu` (initialised at 0) instead of fixing it at 0.

    Example:
        >>> prior = VonMisesPrior(2, concentration=1.0)
        >>> prior().event_shape, prior.embed(torch.zeros(5, 2)).shape
        (torch.Size([2]), torch.Size([5, 4]))
    """

    euclidean = False  # a density on the circle, periodic on the real line

    def __init__(
        self,
        latent_dim: int,
        concentration: float | Sequence[float] | torch.Tensor = 1.0,
        learn_loc: bool = False,
    ) -> None:
        super().__init__(latent_dim)
        try:
            kappa = torch.as_tensor(concentration, dtype=torch.get_default_dtype())
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(
                f"`concentration` must be a positive float or a sequence of {latent_dim}, "
                f"got {concentration!r}"
            ) from e
        if kappa.dim() > 1 or (kappa.dim() == 1 and kappa.shape[0] != self.latent_dim):
            raise ConfigError(
                f"`concentration` must be a float or have shape ({self.latent_dim},) "
                f"(latent_dim), got shape {tuple(kappa.shape)}"
            )
        if not bool((kappa > 0).all()):
            raise ConfigError(f"`concentration` must be positive, got {concentration!r}")
        self.register_buffer("concentration", kappa.expand(self.latent_dim).clone())
        loc = torch.zeros(self.latent_dim)
        if learn_loc:
            self.loc = PyroParam(loc)
        else:
            self.register_buffer("loc", loc)

    def forward(self) -> dist.Distribution:
        return ReparameterizedVonMises(self.loc, self.concentration).to_event(1)

    # -- geometry ----------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """``2 * latent_dim``: the decoder reads cos and sin of every angle."""
        return 2 * self.latent_dim

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        r""":math:`(\cos z, \sin z)`, ``(..., D) -> (..., 2 D)``."""
        return torch.cat([torch.cos(z), torch.sin(z)], dim=-1)

    def interpolate(self, z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r"""Along the shorter arc of every circle, ``(D,), (D,), (T,) -> (T, D)`` in
        :math:`[-\pi, \pi)`.

        .. math:: z(t) = \mathrm{wrap}\big(z_0 + t\, \mathrm{wrap}(z_1 - z_0)\big)
        """
        delta = _wrap(z1 - z0)
        return _wrap(z0 + t[:, None] * delta)

    def figures(self, z: torch.Tensor, labels: torch.Tensor | None, fig_dir: Path) -> list[Path]:
        """Circular histograms of the first dimensions and a torus scatter of the first two.

        Args:
            z: posterior codes ``(N, D)``, angles (any real value, read modulo 2 pi).
            labels: optional class labels ``(N,)`` to colour the scatter.
            fig_dir: directory to write into (created if missing).

        Returns:
            ``[fig_dir / "von_mises_angles.png"]`` plus ``fig_dir / "von_mises_torus.png"``
            when ``latent_dim >= 2``.
        """
        fig_dir = Path(fig_dir)
        fig_dir.mkdir(parents=True, exist_ok=True)
        angles = _wrap(z.detach().double().cpu()).numpy()
        label_values = None if labels is None else labels.detach().cpu().numpy()
        return [self._histograms(angles, fig_dir)] + (
            [self._torus(angles, label_values, fig_dir)] if angles.shape[1] >= 2 else []
        )

    def _histograms(self, angles: np.ndarray, fig_dir: Path) -> Path:
        dims = min(angles.shape[1], MAX_HISTOGRAM_DIMS)
        cols = min(dims, 5)
        rows = (dims + cols - 1) // cols
        fig = Figure(figsize=(2.6 * cols, 2.8 * rows))
        bins = np.linspace(-math.pi, math.pi, 37)
        for d in range(dims):
            ax = fig.add_subplot(rows, cols, d + 1, projection="polar")
            counts, _ = np.histogram(angles[:, d], bins=bins)
            ax.bar(bins[:-1], counts, width=np.diff(bins), align="edge", edgecolor="white")
            ax.set_yticklabels([])
            ax.set_title(f"$z_{{{d + 1}}}$", fontsize=9)
        fig.suptitle(f"angles per dimension (first {dims} of {angles.shape[1]})")
        fig.tight_layout()
        path = fig_dir / "von_mises_angles.png"
        fig.savefig(path, dpi=100)
        return path

    def _torus(self, angles: np.ndarray, labels: np.ndarray | None, fig_dir: Path) -> Path:
        theta, phi = angles[:, 0], angles[:, 1]
        if labels is None:
            groups = [(None, np.ones(len(theta), dtype=bool))]
        else:
            groups = [(value, labels == value) for value in np.unique(labels)]
        cmap = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"]
        fig = Figure(figsize=(12, 5.5))
        flat = fig.add_subplot(1, 2, 1)
        ring = fig.add_subplot(1, 2, 2, projection="3d")
        big, small = 2.0, 0.9
        u, v = np.meshgrid(np.linspace(-math.pi, math.pi, 37), np.linspace(-math.pi, math.pi, 19))
        ring.plot_wireframe(
            (big + small * np.cos(v)) * np.cos(u),
            (big + small * np.cos(v)) * np.sin(u),
            small * np.sin(v),
            color="0.8",
            linewidth=0.3,
            alpha=0.6,
        )
        for i, (value, mask) in enumerate(groups):
            colour = cmap(i % cmap.N)
            name = None if value is None else str(value)
            flat.scatter(theta[mask], phi[mask], s=6, color=colour, label=name)
            ring.scatter(
                (big + small * np.cos(phi[mask])) * np.cos(theta[mask]),
                (big + small * np.cos(phi[mask])) * np.sin(theta[mask]),
                small * np.sin(phi[mask]),
                s=4,
                color=colour,
                depthshade=False,
            )
        flat.set_xlim(-math.pi, math.pi)
        flat.set_ylim(-math.pi, math.pi)
        flat.set_aspect("equal")
        flat.set_xlabel("$z_1$ (rad)")
        flat.set_ylabel("$z_2$ (rad)")
        flat.set_title("flat torus $[-\\pi, \\pi)^2$: opposite edges are glued", fontsize=10)
        if labels is not None and len(groups) <= 20:
            flat.legend(title="label", loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
        ring.set_box_aspect((1, 1, 0.45), zoom=1.3)
        ring.view_init(elev=35, azim=-60)
        ring.set_axis_off()
        ring.set_title("torus: $z_1$ around the ring, $z_2$ around the tube", fontsize=10)
        fig.tight_layout()
        path = fig_dir / "von_mises_torus.png"
        fig.savefig(path, dpi=100)
        return path
