r"""Guide-gradient variance of STL and DReG against their base estimators on a conjugate model.

.. math::
    z \sim \mathcal{N}(0, I_2), \quad x \mid z \sim \mathcal{N}(w z, I_2), \quad
    q(z \mid x) = \mathcal{N}(a \odot x + b, \operatorname{diag}(c^2))

The guide is moved along a line from the exact posterior (t = 0) to a guide away from it
(t = 1). Each data row carries its own copy of the parameters, so one backward pass gives one
independent gradient sample per row; the printed number is the ratio of the total variance of
the guide's gradient (over a, b, c and three data points) of the variant to its base estimator
(STL / Trace_ELBO with one particle; DReG-K / IWAE-K). At t = 0 the variants have zero variance.

Run: ``OMP_NUM_THREADS=1 python benchmarks/estimator_gradient_variance.py [--rows 4000]``
"""

from __future__ import annotations

import sys

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from ppl_vae.cli import Parser, run_command
from ppl_vae.inference.estimators import make_elbo

DTYPE = torch.float64
X_BASE = torch.tensor([[0.5, -1.0], [1.5, 0.3], [-0.7, 2.0]], dtype=DTYPE)
W = 1.2
EXACT = {"a": [W / (W**2 + 1)] * 2, "b": [0.0, 0.0], "c": [(1 / (W**2 + 1)) ** 0.5] * 2}
AWAY = {"a": [0.2, 0.7], "b": [0.3, -0.2], "c": [0.5, 1.1]}


class ConjugateModel(PyroModule):
    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(W * z, 1.0).to_event(1), obs=x)


class ConjugateGuide(PyroModule):
    def __init__(self, point: dict[str, torch.Tensor], rows: int) -> None:
        super().__init__()
        for key in "abc":
            setattr(self, key, nn.Parameter(point[key].expand(rows, -1).clone()))

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(self.a * x + self.b, self.c).to_event(1))


def guide_gradient_variance(spec: str, point: dict[str, torch.Tensor], copies: int) -> float:
    """Total variance of the per-row guide gradient, summed over parameters and data points."""
    x = X_BASE.repeat(copies, 1)
    guide = ConjugateGuide(point, x.shape[0])
    loss = make_elbo(spec).differentiable_loss(ConjugateModel(), guide, x)
    grads = torch.cat(torch.autograd.grad(loss, [guide.a, guide.b, guide.c]), dim=-1)
    return grads.reshape(copies, X_BASE.shape[0], -1).var(0).sum().item()


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000, help="gradient samples per data point")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pyro.set_rng_seed(args.seed)
    pairs = [("stl", "trace"), ("dreg:3", "iwae:3"), ("dreg:10", "iwae:10")]
    header = "t (0 = exact posterior, 1 = away)"
    print(f"{header:>34} " + " ".join(f"{v + '/' + b:>16}" for v, b in pairs))
    with pyro.settings.context(module_local_params=True):
        for t in (0.0, 0.25, 0.5, 1.0):
            point = {
                k: (1 - t) * torch.tensor(EXACT[k], dtype=DTYPE)
                + t * torch.tensor(AWAY[k], dtype=DTYPE)
                for k in "abc"
            }
            ratios = [
                guide_gradient_variance(variant, point, args.rows)
                / guide_gradient_variance(base, point, args.rows)
                for variant, base in pairs
            ]
            print(f"{t:>34.2f} " + " ".join(f"{r:>16.4g}" for r in ratios))


if __name__ == "__main__":
    sys.exit(run_command("estimator_gradient_variance.py", main))
