r"""Spike-and-slab prior for sparse codes (Variational Sparse Coding, Tonolini et al. 2020)."""

from __future__ import annotations

import math
from numbers import Real
from pathlib import Path

import numpy as np
import pyro.distributions as dist
import torch
from matplotlib.figure import Figure

from ..distributions.family import VariationalFamily
from ..distributions.spike_and_slab import SpikeAndSlab, SpikeAndSlabFamily
from ..errors import ConfigError
from .base import Prior


class SpikeAndSlabPrior(Prior):
    r"""Factorised spike-and-slab prior: each code is exactly 0 with probability :math:`1-\alpha`.

    .. math:: p(z) = \prod_d \big[(1-\alpha)\,\delta_0(z_d) + \alpha\,\mathcal{N}(z_d;\,0, 1)\big]

    Densities are w.r.t. a point mass at zero plus Lebesgue measure
    (see :mod:`ppl_vae.models.distributions.spike_and_slab`). The guide is
    :class:`~ppl_vae.models.distributions.spike_and_slab.SpikeAndSlabFamily`: a relaxed
    (binary concrete) gate while training, so gradients are pathwise, and exact zeros in eval mode.

    The default :math:`\alpha = 1/2` is the uninformative gate: the prior then puts no pressure
    on the number of active dimensions beyond the cost of the slab KL, and codes are as sparse as
    the data make them. Smaller :math:`\alpha` asks for sparser codes.

    Args:
        latent_dim: D.
        alpha: prior probability :math:`\alpha \in (0, 1)` that a code is drawn from the slab.
        initial_temperature: start temperature of the guide's relaxed gate.
        final_temperature: temperature the guide's gate is annealed to (see
            :class:`~ppl_vae.models.distributions.spike_and_slab.SpikeAndSlabFamily`).

    Example:
        >>> SpikeAndSlabPrior(3, alpha=0.2)().event_shape
        torch.Size([3])
    """

    euclidean = False  # exact zeros at evaluation: a point mass no continuous family matches

    def __init__(
        self,
        latent_dim: int,
        alpha: float = 0.5,
        initial_temperature: float = 1.0,
        final_temperature: float = 0.1,
    ) -> None:
        super().__init__(latent_dim)
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, Real)
            or not math.isfinite(alpha)
            or not 0 < alpha < 1
        ):
            raise ConfigError(f"`alpha` must be in (0, 1), got {alpha!r}")
        # Validate the temperatures now, not when the guide is built.
        SpikeAndSlabFamily(initial_temperature, final_temperature)
        self.initial_temperature = float(initial_temperature)
        self.final_temperature = float(final_temperature)
        self.register_buffer("alpha", torch.full((self.latent_dim,), float(alpha)))
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))

    def forward(self) -> dist.Distribution:
        return SpikeAndSlab(gate_probs=self.alpha, loc=self.loc, scale=self.scale).to_event(1)

    def guide_family(self) -> VariationalFamily:
        """Spike-and-slab q(z|x) with an annealed relaxed gate (exact in eval mode)."""
        return SpikeAndSlabFamily(self.initial_temperature, self.final_temperature)

    # -- summaries and figures ----------------------------------------------------------------
    @staticmethod
    def summary(z: torch.Tensor) -> dict[str, float]:
        """Sparsity of codes ``z`` ``(N, D)`` (exact samples, i.e. the guide in eval mode).

        Returns:
            ``zero_fraction``: fraction of entries exactly 0; ``dead_dims``: number of dimensions
            that are 0 in every code.
        """
        zero = z.detach() == 0
        return {
            "zero_fraction": float(zero.float().mean()),
            "dead_dims": float(zero.all(dim=0).sum()),
        }

    def figures(self, z: torch.Tensor, labels: torch.Tensor | None, fig_dir: Path) -> list[Path]:
        """Activity per dimension (bar chart) and the code histogram with the zero mass apart.

        Args:
            z: codes ``(N, D)``, exact samples (eval mode) so that zeros are exact.
            labels: unused (activity is not split by class).
            fig_dir: directory for the PNG files.

        Returns:
            ``[fig_dir / "spike_and_slab_activity.png", fig_dir / "spike_and_slab_codes.png"]``.
        """
        fig_dir = Path(fig_dir)
        fig_dir.mkdir(parents=True, exist_ok=True)
        codes = z.detach().reshape(-1, z.shape[-1]).cpu().double().numpy()
        active = codes != 0
        activity = active.mean(axis=0)
        dims = np.arange(codes.shape[1])

        fig = Figure(figsize=(max(4.0, 0.35 * len(dims) + 2.0), 3.0))
        ax = fig.add_subplot()
        ax.bar(dims, activity, color="tab:blue")
        ax.axhline(float(self.alpha.mean()), color="k", ls="--", lw=1, label=r"prior $\alpha$")
        ax.set_xlabel("latent dimension")
        ax.set_ylabel("fraction of nonzero codes")
        ax.set_ylim(0, 1)
        ax.set_xticks(dims)
        ax.legend(loc="upper right", fontsize="small")
        ax.set_title(f"activity per dimension ({len(codes)} codes)")
        fig.tight_layout()
        activity_path = fig_dir / "spike_and_slab_activity.png"
        fig.savefig(activity_path, dpi=100)

        nonzero = codes[active]
        zero_fraction = 1.0 - float(active.mean()) if codes.size else 0.0
        fig = Figure(figsize=(7.0, 3.0))
        ax_zero, ax_slab = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 4]})
        ax_zero.bar([0], [zero_fraction], color="tab:red", width=0.6)
        ax_zero.set_xticks([0], ["z = 0"])
        ax_zero.set_ylim(0, 1)
        ax_zero.set_ylabel("fraction of all codes")
        ax_zero.set_title(f"exact zeros: {zero_fraction:.1%}", fontsize="medium")
        if nonzero.size:
            ax_slab.hist(nonzero, bins=50, density=True, color="tab:blue", alpha=0.8)
        ax_slab.set_xlabel("nonzero code value")
        ax_slab.set_ylabel("density (nonzero codes)")
        ax_slab.set_title(f"slab values ({nonzero.size} codes)", fontsize="medium")
        fig.tight_layout()
        codes_path = fig_dir / "spike_and_slab_codes.png"
        fig.savefig(codes_path, dpi=100)
        return [activity_path, codes_path]
