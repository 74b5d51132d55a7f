r"""``ppl-vae evaluate`` and ``ppl-vae sample``: reopen a run directory of any kind."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..models.errors import ConfigError
from .common import out_path

__all__ = ["SAMPLES_PER_CLASS", "cmd_evaluate", "cmd_sample", "register"]

SAMPLES_PER_CLASS = 10


def register(sub: Any) -> None:
    """Add ``evaluate`` and ``sample`` to the ``ppl-vae`` sub-parsers."""
    from ..kinds.m2 import LOG_LIKELIHOOD_SAMPLES
    from .score import add_eval_memory_option

    p = sub.add_parser(
        "evaluate",
        help="test ELBO and importance-sampled log-likelihood of a run (M2: and accuracy)",
        description="Evaluate a run directory of any kind on its test split. VAE runs: test ELBO "
        "and importance-sampled log p(x). M2 runs (`ppl-vae ssl`), with the best-validation "
        "weights the run evaluated: test accuracy (overall and per class), the unlabelled ELBO "
        "and log p(x), both with y summed out exactly. Writes RUN_DIR/evaluation.json and "
        "per-point scores.",
    )
    p.add_argument("run_dir", help="a run directory written by `ppl-vae fit` or `ppl-vae ssl`")
    p.add_argument(
        "--log-likelihood-samples",
        type=int,
        help="importance samples K (default: the run's; M2: K z per class, default "
        f"{LOG_LIKELIHOOD_SAMPLES})",
    )
    p.add_argument(
        "--test-data",
        help="score this .npy/.npz file instead of the test split (M2: accuracy if it has "
        "labels 'y', else log p(x) and ELBO only)",
    )
    add_eval_memory_option(p, "; VAE and user runs (M2 runs use their fixed chunks)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "sample",
        help="draw samples from a trained run's prior and decoder",
        description="Draw z ~ p(z) and decode. VAE runs: N samples, saved as (N, *data_shape). "
        "M2 runs: N codes z ~ p(z), each decoded with every class y, saved as "
        "(K, N, *data_shape) (x[k, j]: class k with the style z_j; one row per class in the "
        ".png).",
    )
    p.add_argument("run_dir", help="a run directory written by `ppl-vae fit` or `ppl-vae ssl`")
    p.add_argument(
        "-n",
        type=int,
        default=None,
        help=f"number of samples (default 64; M2 runs: per class, default {SAMPLES_PER_CLASS})",
    )
    p.add_argument(
        "--out",
        type=out_path,
        help="a .npy file (default RUN_DIR/samples_nN.npy, M2: samples_nN_per_class.npy; a .png "
        "is written beside it)",
    )
    p.add_argument(
        "--draw",
        action="store_true",
        help="draw x ~ p(x|z) instead of showing the likelihood's mean E[x|z]",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=cmd_sample)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..runs.reopen import evaluate

    out = evaluate(
        args.run_dir,
        num_samples=args.log_likelihood_samples,
        device=args.device,
        test_data=args.test_data,
        eval_memory=args.eval_memory,
        progress=not args.quiet,
    )
    print(json.dumps(out, indent=2))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import pyro
    import torch

    from ..figures import _as_images, image_grid
    from ..runs.reopen import load_run

    if args.n is not None and args.n <= 0:
        raise ConfigError(f"-n must be positive, got {args.n}")
    run = load_run(args.run_dir, device=args.device)
    m2 = run.kind == "m2"
    n = args.n if args.n is not None else (SAMPLES_PER_CLASS if m2 else 64)
    name = f"samples_n{n}_per_class.npy" if m2 else f"samples_n{n}.npy"
    out = Path(args.out) if args.out else run.run_dir / name
    if out.suffix != ".npy":
        raise ConfigError(f"--out must be a .npy file, got {str(out)!r}")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{str(out)!r} exists; pass --overwrite to replace it")
    what = "draws from p(x|z)" if args.draw else "likelihood mean"
    pyro.set_rng_seed(args.seed)
    with torch.no_grad():
        if m2:
            # n codes z ~ p(z), each decoded with every class: x[k, j] is class k, style z_j.
            z, x = run.model.sample_per_class(n, draw=args.draw)
        elif run.kind == "user":
            from ..kinds.user import sample_from_model

            x = sample_from_model(run.model, run.dataset.test_x, n, draw=args.draw)
        else:
            z, x = run.vae.sample(n)
            if args.draw:
                x = run.vae.decode(z).sample()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, x.cpu().numpy())
    cols = min(16, n)
    if m2:
        names = list(run.dataset.class_names or [str(i) for i in range(len(x))])
        rows, titles = [], []
        for c in range(len(x)):
            imgs = _as_images(x[c], run.dataset.image_shape)
            for i in range(0, n, cols):
                rows.append(imgs[i : i + cols])
                titles.append(f"class {names[c]}" if i == 0 else "")
        png = image_grid(
            out.with_suffix(".png"),
            rows,
            titles,
            suptitle=f"{n} samples per class (rows);\n"
            + (
                f"z ~ p(z | class) per row ({what})"
                if run.model.prior.label_conditional
                else f"z ~ p(z) shared down each column ({what})"
            ),
        )
    else:
        imgs = _as_images(x, run.dataset.image_shape)
        png = image_grid(
            out.with_suffix(".png"),
            [imgs[i : i + cols] for i in range(0, n, cols)],
            suptitle=f"{n} samples ({what})",
        )
    print(f"wrote {out} ({tuple(x.shape)}) and {png}")
    return 0
