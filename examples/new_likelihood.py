r"""Declare a likelihood that ppl_vae does not ship, and train it.

The whole declaration is the class below: a :class:`Likelihood` that states its decoder outputs
per pixel (one: the location) and maps them to p(x|z). Heavy-tailed Student-t pixels are robust to
outlying pixel values. The same class trains from the command line:

    ppl-vae fit --likelihood examples/new_likelihood.py:StudentTLikelihood --likelihood-arg df=4
"""

import sys

import pyro.distributions as dist
import torch
from pyro.nn import PyroParam
from torch.distributions import constraints

from ppl_vae import fit
from ppl_vae.cli import Parser, run_command
from ppl_vae.models.likelihoods import Likelihood


class StudentTLikelihood(Likelihood):
    r"""Student-t pixels, :math:`p(x \mid \eta) = \prod_i \mathrm{St}(x_i;\, \nu, \eta_i, s)`, learned s."""

    params_per_element = 1

    def __init__(self, data_shape: tuple[int, ...], df: float = 4.0) -> None:
        super().__init__(data_shape)
        self.df = float(df)
        self.scale = PyroParam(torch.tensor(0.1), constraint=constraints.positive)

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        (loc,) = self.split(out)
        scale = self.scale.expand(loc.shape)
        return dist.StudentT(self.df, loc, scale).to_event(self.event_dim)


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="runs/new-likelihood")
    parser.add_argument("--smoke", action="store_true", help="a tiny budget (for the tests)")
    args = parser.parse_args(argv)
    budget = dict(epochs=args.epochs)
    if args.smoke:
        budget.update(epochs=1, hidden_dims=[32], log_likelihood_samples=10)
    for likelihood in (StudentTLikelihood, "normal"):
        result = fit(
            likelihood=likelihood,
            out=f"{args.out}/{getattr(likelihood, '__name__', likelihood)}",
            overwrite=True,
            quiet=True,
            **budget,
        )
        m = result.metrics
        print(f"{m['likelihood']:>40}: test log p(x) {m['test_log_likelihood']:.2f} nats per digit")


if __name__ == "__main__":
    sys.exit(run_command("new_likelihood.py", main))
