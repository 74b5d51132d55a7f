r"""Declare a prior that ppl_vae does not ship, and train it with ``trace`` and ``meanfield``.

The whole declaration is the class below: a :class:`Prior` whose ``forward`` returns p(z).
No guide code: q(z|x) mirrors the prior (a Student-t with learned df, loc and scale per
dimension). No KL(StudentT || StudentT) is registered anywhere, so ``meanfield`` estimates the KL
term by Monte Carlo and warns once. The same class trains from the command line:

    ppl-vae fit --prior examples/new_prior.py:StudentTPrior --prior-arg df=3 --estimator meanfield

:class:`TwoClusterPrior` is a prior with nothing to mirror (a mixture): q(z|x) is then a diagonal
Normal on the prior's support, again with no guide code.

    ppl-vae fit --prior examples/new_prior.py:TwoClusterPrior
"""

import sys

import pyro.distributions as dist
import torch
from pyro.nn import PyroParam

from ppl_vae import fit
from ppl_vae.cli import Parser, run_command
from ppl_vae.models.priors import Prior


class StudentTPrior(Prior):
    r"""Heavy-tailed prior :math:`p(z) = \prod_d \mathrm{St}(z_d;\, \nu, 0, 1)`."""

    def __init__(self, latent_dim: int, df: float = 3.0) -> None:
        super().__init__(latent_dim)
        self.register_buffer("df", torch.full((latent_dim,), float(df)))

    def forward(self) -> dist.Distribution:
        zero = torch.zeros_like(self.df)
        return dist.StudentT(self.df, zero, torch.ones_like(self.df)).to_event(1)


class TwoClusterPrior(Prior):
    r""":math:`p(z) = \tfrac12 \mathcal{N}(z; -m, I) + \tfrac12 \mathcal{N}(z; m, I)`, m learned."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        self.m = PyroParam(torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        locs = torch.stack([-self.m, self.m])
        both = dist.Categorical(logits=locs.new_zeros(2))
        return dist.MixtureSameFamily(both, dist.Normal(locs, 1.0).to_event(1))


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="runs/new-prior")
    parser.add_argument("--smoke", action="store_true", help="a tiny budget (for the tests)")
    args = parser.parse_args(argv)
    budget = dict(epochs=args.epochs)
    if args.smoke:
        budget.update(epochs=1, hidden_dims=[32], log_likelihood_samples=10)
    for prior, estimator in ((StudentTPrior, "trace"), (StudentTPrior, "meanfield"),
                             (TwoClusterPrior, "trace")):  # fmt: skip
        result = fit(
            prior=prior,
            estimator=estimator,
            out=f"{args.out}/{prior.__name__}-{estimator}",
            overwrite=True,
            quiet=True,
            **budget,
        )
        m = result.metrics
        print(
            f"{prior.__name__:>15} {estimator:>9}: test ELBO {m['test_elbo']:.2f}, "
            f"log p(x) {m['test_log_likelihood']:.2f} nats per digit"
        )


if __name__ == "__main__":
    sys.exit(run_command("new_prior.py", main))
