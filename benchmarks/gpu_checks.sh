#!/usr/bin/env bash
# The checks that need a GPU, as one prepared command for a session that is lent one.
#
# A lent machine has 15 minutes of device time in all (its start included) and 10 minutes per
# command, no internet, and neither pyro-ppl nor arviz. So:
#
#   here, with the package registry:   bash benchmarks/gpu_checks.sh wheels
#       downloads the wheels the GPU machine lacks into .whl/ (git-ignored; 2.6 MiB);
#   there, through the device tool:    bash benchmarks/gpu_checks.sh run      (carry: [".whl"])
#       installs them and the project, then runs, each under its own time limit, writing every
#       log under $OUT (the device tool's; default ./gpu-checks, git-ignored):
#         1. the suite's device tests on the GPU (pytest --device cuda --device-only: the fast
#            paths' bitwise equality with Pyro, the priors, likelihoods, data and VAE on CUDA);
#         2. benchmarks/m2_speed.py --device cuda (the M2 step against a hand-written M2);
#         3. benchmarks/speed.py --device cuda --skip-scale (the VAE epoch against
#            hand-written PyTorch and Pyro's usual loop).
#       At most 8 minutes by these limits, plus the install: inside one device command's 10
#       (not yet run on a GPU: none was lent so far).
#
# DEVICE=cpu QUICK=1 bash benchmarks/gpu_checks.sh run checks the plumbing on any machine (the
# same steps on the CPU, smoke-test budgets; tests/test_scripts.py runs it that way).
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu-checks}
WHEELS=(pyro-ppl==1.9.2 pyro-api==0.1.2 arviz==0.23.4 xarray-einstats==0.9.1 h5netcdf==1.8.3
    platformdirs==4.14.9)

case "${1:-}" in
wheels)
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "${WHEELS[@]}" || exit 2
    ls .whl
    exit 0
    ;;
run) ;;
*)
    echo "gpu_checks.sh: error: expected 'wheels' (here) or 'run' (on the GPU machine), got '${1:-}'" >&2
    exit 2
    ;;
esac

mkdir -p "$OUT"
if ! "$PY" -c "import ppl_vae, pyro, arviz" 2>/dev/null; then
    [ -d .whl ] || { echo "gpu_checks.sh: error: no .whl/ (run 'gpu_checks.sh wheels' here and carry .whl)" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    # editable, so that ppl_vae.models and ppl_vae.guides map onto models/ and guides/
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --break-system-packages \
        -e . >>"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
fi

status=0
step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

"$PY" -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" \
    | tee "$OUT/summary.txt"
if [ "${QUICK:-0}" = 1 ]; then
    step tests 300 "$PY" -m pytest -q -p no:cacheprovider --device "$DEVICE" --device-only -x \
        tests/test_m2_fastpath.py
    step m2_speed 300 "$PY" benchmarks/m2_speed.py --device "$DEVICE" --quick --cases 64
    step speed 300 "$PY" benchmarks/speed.py --device "$DEVICE" --quick --skip-scale --rounds 1
else
    step tests 120 "$PY" -m pytest -q -p no:cacheprovider --device "$DEVICE" --device-only
    step m2_speed 210 "$PY" benchmarks/m2_speed.py --device "$DEVICE" --rounds 5 \
        --json "$OUT/m2_speed.json"
    step speed 150 "$PY" benchmarks/speed.py --device "$DEVICE" --skip-scale --rounds 3 \
        --json "$OUT/speed.json"
fi
exit $status
