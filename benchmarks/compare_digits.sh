#!/usr/bin/env bash
# The estimator comparison table on digits for the README (ppl-vae compare).
#
# Same model (Gaussian prior, Bernoulli likelihood with dynamic binarisation, MLP 256-128,
# latent_dim 10), same data split, same initial weights per seed; 6 estimators x 3 seeds,
# 100 epochs each, every run in a fresh process (peak RSS per run). Test log-likelihood with
# K = 1000; gradient SNR/variance from 100 evaluations on one fixed batch of 128 training points
# after epochs 1, 50 and 100; PSIS k-hat of 100 test points x 1000 importance samples.
#
# Budget: about 8-12 minutes on one CPU core of a shared 2-core machine (OMP_NUM_THREADS=1).
# Writes $OUT/compare.csv, compare.md, curves.csv, khat.csv, figures/, runs/ (default
# runs/compare-digits). `python -m ppl_vae.cli.compare` is the same command as `ppl-vae compare`.
#
# Usage: benchmarks/compare_digits.sh [extra ppl-vae compare flags, e.g. --device cuda]
#
# The interpreter: $PYTHON if set; else `python` (or `python3`) on PATH (the README's
# `pip install -e .`, in whatever environment is active) if it has torch and pyro; else the
# repository's .venv/bin/python if there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
has_deps() {
    "$1" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("torch", "pyro")))' \
        2>/dev/null
}
if [[ -z "${PYTHON:-}" ]]; then
    for candidate in python python3; do
        if command -v "$candidate" >/dev/null && has_deps "$candidate"; then
            PYTHON="$candidate"
            break
        fi
    done
fi
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then
        PYTHON=.venv/bin/python
    else
        echo "compare_digits.sh: no Python with torch and pyro found: install the package" \
            "(pip install -e .), activate its environment, or set PYTHON=/path/to/python" >&2
        exit 1
    fi
fi
OUT="${OUT:-runs/compare-digits}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m ppl_vae.cli.compare \
    --estimators trace,meanfield,tracegraph,iwae:5,dreg:5,stl \
    --seeds 0,1,2 \
    --data digits --epochs 100 --device cpu \
    --grad-points 1,50,100 --grad-repeats 100 \
    --khat-points 100 --log-likelihood-samples 1000 \
    --out "$OUT" --overwrite "$@"
