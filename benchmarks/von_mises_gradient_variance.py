r"""Gradient variance: implicit reparameterisation vs the score function for a von Mises guide.

For :math:`q = \mathrm{vM}(\mu, \kappa)` and :math:`f(z) = \cos z + \sin^2 2z` it estimates,
with the same number of samples per estimate, the gradients wrt :math:`\mu` and :math:`\kappa` of

* ``E_q[f]``: :math:`\nabla E_q[f(z)]`, pathwise (``ReparameterizedVonMises.rsample``) against
  the plain score function :math:`f(z)\,\nabla \log q(z)` (samples of pyro's ``dist.VonMises``);
* ``ELBO``: Pyro's ``Trace_ELBO`` on the model :math:`z \sim \mathrm{vM}(0, 1)`,
  ``pyro.factor(f(z))``, with the guide site ``ReparameterizedVonMises`` (pathwise) against
  pyro's ``dist.VonMises`` (no ``rsample``: Pyro falls back to the score function).

``--replicates`` independent estimates are drawn at once (a plate of replicated guide
parameters, whose gradients do not interact), and their variance is reported with the ratio
score / implicit. Both estimators are unbiased, so their means must agree within sampling
error (the ``|diff| / se`` column).

Example:
    python benchmarks/von_mises_gradient_variance.py --seed 0 --device cpu
"""

from __future__ import annotations

import math
import sys

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO

from ppl_vae.cli import Parser, run_command
from ppl_vae.models.distributions.von_mises import ReparameterizedVonMises
from ppl_vae.training.setup import resolve_device


def f(z: torch.Tensor) -> torch.Tensor:
    """The test function, smooth and periodic."""
    return torch.cos(z) + torch.sin(2.0 * z) ** 2


def expectation_grads(
    kind: str, loc: torch.Tensor, kappa: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-replicate estimates of :math:`\nabla_{\mu,\kappa} E_q[f(z)]`, each ``(R,)``."""
    if kind == "implicit":
        z = ReparameterizedVonMises(loc, kappa).rsample((num_samples,))
        objective = f(z).mean(0).sum()
    else:
        q = dist.VonMises(loc, kappa)
        z = q.sample((num_samples,))
        objective = (f(z) * q.log_prob(z)).mean(0).sum()
    return torch.autograd.grad(objective, [loc, kappa])


def elbo_grads(
    kind: str, loc: torch.Tensor, kappa: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-replicate estimates of :math:`\nabla_{\mu,\kappa}` ELBO via Pyro's ``Trace_ELBO``."""
    guide_cls = ReparameterizedVonMises if kind == "implicit" else dist.VonMises

    def model() -> None:
        with pyro.plate("replicates", loc.shape[0]):
            z = pyro.sample("z", dist.VonMises(torch.zeros_like(loc), torch.ones_like(kappa)))
            pyro.factor("f", f(z))

    def guide() -> None:
        with pyro.plate("replicates", loc.shape[0]):
            pyro.sample("z", guide_cls(loc, kappa))

    elbo = Trace_ELBO(num_particles=num_samples, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, guide)
    return torch.autograd.grad(-loss, [loc, kappa])


def main(argv: list[str] | None = None) -> None:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--kappas", type=float, nargs="+", default=[1.0, 8.0, 30.0])
    parser.add_argument("--loc", type=float, default=0.5, help="guide location")
    parser.add_argument(
        "--num-samples", type=int, default=1, help="samples per gradient estimate (both)"
    )
    parser.add_argument(
        "--replicates", type=int, default=20_000, help="independent estimates per cell"
    )
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    pyro.set_rng_seed(args.seed)
    dtype = torch.float64

    print(
        f"f(z) = cos z + sin^2 2z, guide loc = {args.loc}, {args.num_samples} sample(s) per "
        f"estimate, {args.replicates} estimates per cell, seed {args.seed}, {device}, float64\n"
    )
    print(
        "| kappa | objective | parameter | mean (implicit) | mean (score) | |diff| / se "
        "| var (implicit) | var (score) | ratio score / implicit |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for kappa_value in args.kappas:
        for objective, estimator in (("E_q[f]", expectation_grads), ("ELBO", elbo_grads)):
            grads = {}
            for kind in ("implicit", "score"):
                loc = torch.full((args.replicates,), args.loc, dtype=dtype, device=device)
                kappa = torch.full_like(loc, kappa_value)
                loc.requires_grad_()
                kappa.requires_grad_()
                grads[kind] = estimator(kind, loc, kappa, args.num_samples)
            for i, name in enumerate(("loc", "kappa")):
                gi, gs = grads["implicit"][i], grads["score"][i]
                vi, vs = float(gi.var()), float(gs.var())
                se = math.sqrt((vi + vs) / args.replicates)
                z = abs(float(gi.mean()) - float(gs.mean())) / se
                print(
                    f"| {kappa_value:g} | {objective} | {name} | {float(gi.mean()):.4g} "
                    f"| {float(gs.mean()):.4g} | {z:.2f} | {vi:.3g} | {vs:.3g} | {vs / vi:.3g} |"
                )


if __name__ == "__main__":
    sys.exit(run_command("von_mises_gradient_variance.py", main))
