r"""``ppl-vae plot``: the latent figures of a trained run, without training
(:func:`ppl_vae.latent_figures.plot_run`)."""

from __future__ import annotations

import argparse
from typing import Any

from ..models.errors import ConfigError
from .common import out_path

__all__ = ["cmd_plot", "register"]


def register(sub: Any) -> None:
    """Add ``plot`` to the ``ppl-vae`` sub-parsers."""
    from ..latent_figures import INACTIVE_KL, LATENT_FIGURES

    p = sub.add_parser(
        "plot",
        help="latent traversals, posterior histograms and KL per dimension of a run",
        description="Reopen a run directory of any kind (the weights it evaluated) and write "
        "its latent figures: traversals_<site>.png (each dimension swept across the prior's "
        "quantiles, von Mises: around the circle, the others at a test point's posterior mean; "
        f"rows by KL, below {INACTIVE_KL} nats marked inactive; M2: y at the predicted class), "
        "posterior_<site>.png (the encoder's means and scales per dimension over the test "
        "split) and kl_per_dimension.png (one panel per latent site).",
    )
    p.add_argument("run_dir", help="a run directory written by `ppl-vae fit` or `ppl-vae ssl`")
    p.add_argument("--out", type=out_path, help="directory for the PNGs (default RUN_DIR/figures)")
    p.add_argument(
        "--which",
        default=",".join(LATENT_FIGURES),
        help=f"comma-separated figures, some of {','.join(LATENT_FIGURES)} (default: all)",
    )
    p.add_argument(
        "--test-point",
        type=int,
        default=0,
        help="the test point whose posterior mean a traversal holds (default 0)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from ..latent_figures import LATENT_FIGURES, plot_run

    which = [w.strip() for w in args.which.split(",") if w.strip()]
    unknown = [w for w in which if w not in LATENT_FIGURES]
    if unknown or not which:
        raise ConfigError(f"--which takes some of {','.join(LATENT_FIGURES)}, got {args.which!r}")
    out = plot_run(
        args.run_dir,
        args.out,
        which,
        point=args.test_point,
        device=args.device,
        progress=not args.quiet,
    )
    for path in out.paths:
        print(path)
    return 0
