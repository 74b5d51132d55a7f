r"""Against posterior collapse on digits: the default VAE and a two-layer hierarchical VAE under
four training recipes, equal epochs, seeds 0, 1, 2.

Recipes: the plain ELBO (the default), a linear KL warm-up over 10 epochs, free bits of 0.1
nats per latent dimension (Kingma et al. 2016), and the IWAE bound with k = 5 (Burda et al.
2016). Models: the built-in VAE (10 latent dimensions, MLP 256-128) and ``--model hierarchical``
with z1 of 20 below the top z2 of 10 (two hidden layers of 64 between them), as in
``benchmarks/latent_structure_digits.py``; ``--models`` adds ``ladder`` (``--model ladder``
with the same widths), ``hierarchical3`` (L = 3: z1 40, z2 20, z3 10) and ``vae-bn``,
``hierarchical-bn``, ``ladder-bn`` (the same three with batch normalisation before every
hidden activation, ``norm="batch"``, as Sønderby et al. 2016). Every run: dynamic
binarisation, Bernoulli, 50 epochs (``--epochs``), test log p(x) with K = 1000, the best
validation epoch's weights. Prints, for each seed, the test log p(x) and the last epoch's
validation KL per latent site, then a Markdown table of mean ± sd.

``--data`` trains on another data set instead of digits: anything ``fit(data=...)`` takes, e.g.
the 14x14 Fashion-MNIST subset of ``benchmarks/ssl_defaults.py`` (``runs/data/fashion14.npz``,
7,500 images of 196 pixels, written by that script from the Debian package
``dataset-fashion-mnist``), split by the seed as ``fit`` splits any file.

    python benchmarks/kl_recipes_digits.py --seeds 0,1,2
    python benchmarks/kl_recipes_digits.py --models ladder --recipes plain,warmup
    python benchmarks/kl_recipes_digits.py --data runs/data/fashion14.npz --epochs 100 \
        --models vae,hierarchical,ladder --recipes plain,warmup
"""

from __future__ import annotations

import statistics
import sys
import warnings

from ppl_vae import fit
from ppl_vae.cli import Parser, int_list, name_list, run_command

RECIPES = {  # key: (row label, fit options)
    "plain": ("plain ELBO (default)", {}),
    "warmup": ("KL warm-up, 10 epochs", {"warmup_epochs": 10}),
    "freebits": ("free bits, 0.1 nats per dimension", {"free_bits": 0.1}),
    "iwae": ("IWAE, k = 5", {"estimator": "iwae:5"}),
}
_TWO_LAYERS = {"lower_latent_dims": [20], "layer_hidden_dims": [64, 64]}
MODELS = {  # key: (column label, fit options)
    "vae": ("VAE, 1 layer", {}),
    "hierarchical": (
        "hierarchical, 2 layers",
        {"model": "hierarchical", "model_args": _TWO_LAYERS},
    ),
    "ladder": ("ladder, 2 layers", {"model": "ladder", "model_args": _TWO_LAYERS}),
    "hierarchical3": (
        "hierarchical, 3 layers",
        {"model": "hierarchical", "model_args": {**_TWO_LAYERS, "lower_latent_dims": [40, 20]}},
    ),
    "vae-bn": (
        "VAE, 1 layer, batch norm",
        {"encoder_args": {"norm": "batch"}, "decoder_args": {"norm": "batch"}},
    ),
    "hierarchical-bn": (
        "hierarchical, 2 layers, batch norm",
        {"model": "hierarchical", "model_args": {**_TWO_LAYERS, "norm": "batch"}},
    ),
    "ladder-bn": (
        "ladder, 2 layers, batch norm",
        {"model": "ladder", "model_args": {**_TWO_LAYERS, "norm": "batch"}},
    ),
}


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int_list, default="0,1,2")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--log-likelihood-samples", type=int, default=1000)
    p.add_argument(
        "--models", type=name_list(MODELS), default="vae,hierarchical",
        help=f"columns, of {list(MODELS)}",
    )  # fmt: skip
    p.add_argument(
        "--recipes", type=name_list(RECIPES), default=",".join(RECIPES),
        help=f"rows, of {list(RECIPES)}",
    )  # fmt: skip
    p.add_argument("--data", default="digits", help="a data set name or .npy/.npz file")
    args = p.parse_args(argv)
    seeds = args.seeds
    models = {k: v for k, v in MODELS.items() if k in args.models}  # in the table's order
    recipes = {k: v for k, v in RECIPES.items() if k in args.recipes}
    warnings.simplefilter("ignore")  # the collapse warning, expected for some recipes
    rows = []
    for recipe, options in recipes.values():
        cells = []
        for model, model_options in models.values():
            values = []
            for seed in seeds:
                m = fit(data=args.data, epochs=args.epochs, seed=seed, binarize="dynamic", quiet=True,
                        figures=False, log_likelihood_samples=args.log_likelihood_samples,
                        **options, **model_options).metrics  # fmt: skip
                values.append(m["test_log_likelihood"])
                kl = {name: round(site["kl"], 3) for name, site in m.get("latent", {}).items()}
                print(f"  seed {seed}: log p(x) {values[-1]:.3f}, last-epoch KL {kl}", flush=True)
            print(recipe, "|", model, "|", [round(v, 3) for v in values], flush=True)
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {sd:.2f}")
        rows.append(f"| {recipe} | " + " | ".join(cells) + " |")
    print("\n| recipe | " + " | ".join(label for label, _ in models.values()) + " |")
    print("|---|" + "---:|" * len(models))
    print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(run_command("kl_recipes_digits.py", main))
