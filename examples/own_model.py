r"""Train your own Pyro model/guide pair with ppl_vae: a two-layer VAE, z2 -> z1 -> x.

Nothing below is a ppl_vae class: an ordinary :class:`~pyro.nn.PyroModule` whose ``model(x)``
observes ``x`` under ``pyro.plate("data")`` and whose ``guide(x)`` samples both latent sites
(bottom-up inference, q(z1|x) q(z2|z1), as in Burda et al. 2016). ``fit(model=...)`` trains it on
the same trainer as the built-in VAE and scores it by importance sampling over both sites. The
same class trains from the command line:

    ppl-vae fit --model examples/own_model.py:TwoLayerVAE --model-arg z1=16 --model-arg z2=4 \
        --binarize dynamic --epochs 30 --out runs/two-layer
"""

from __future__ import annotations

import sys

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn

from ppl_vae import fit
from ppl_vae.cli import Parser, run_command


class TwoLayerVAE(PyroModule):
    r"""Two stochastic layers, :math:`z_2 \to z_1 \to x` (Burda et al.'s bottom-up inference).

    .. math:: p(z_2) = \mathcal{N}(0, I),\; p(z_1 \mid z_2) = \mathcal{N}(\mu(z_2), \sigma(z_2)),
        \; p(x \mid z_1) = \mathrm{Bernoulli}(f(z_1)); \quad q(z_1 \mid x)\, q(z_2 \mid z_1)
    """

    def __init__(self, data_shape: tuple[int, ...], z1: int = 8, z2: int = 4, hidden: int = 64):
        super().__init__()
        d = int(torch.Size(data_shape).numel())
        self.data_shape, self.z1, self.z2 = tuple(data_shape), z1, z2
        self.dec_x = nn.Sequential(nn.Linear(z1, hidden), nn.Softplus(), nn.Linear(hidden, d))
        self.dec_z1 = nn.Sequential(nn.Linear(z2, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z1))
        self.enc_z1 = nn.Sequential(nn.Linear(d, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z1))
        self.enc_z2 = nn.Sequential(nn.Linear(z1, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z2))

    @staticmethod
    def _normal(out: torch.Tensor) -> dist.Distribution:
        loc, raw = out.chunk(2, -1)
        return dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1)

    @pyro_method
    def model(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        with pyro.plate("data", n, dim=-1):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(self.z2), 1.0).to_event(1))
            z1 = pyro.sample("z1", self._normal(self.dec_z1(z2)))
            logits = self.dec_x(z1).reshape(*z1.shape[:-1], *self.data_shape)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(len(self.data_shape)), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            z1 = pyro.sample("z1", self._normal(self.enc_z1(x.reshape(x.shape[0], -1))))
            pyro.sample("z2", self._normal(self.enc_z2(z1)))


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="a tiny run (for the tests)")
    args = p.parse_args(argv)
    budget = dict(epochs=2, max_train=256, log_likelihood_samples=10) if args.smoke else {}
    result = fit(
        model=TwoLayerVAE,
        model_args={"z1": 16, "z2": 4},
        binarize="dynamic",
        out="runs/own-model",
        overwrite=True,
        quiet=True,
        **({"epochs": 30} | budget),
    )
    m = result.metrics
    print(
        f"latent sites {m['latent_sites']}: test ELBO {m['test_elbo']:.2f}, "
        f"log p(x) {m['test_log_likelihood']:.2f} nats per digit (K={m['log_likelihood_samples']})"
    )


if __name__ == "__main__":
    sys.exit(run_command("own_model.py", main))
