r"""Peak memory and time of the importance-sampled log p(x) at K = 100 / 1000 / 5000, with the
fixed chunk of 100 particles x 512 points and with the memory budget (``--eval-memory``).

Two networks: the default MLP (64-256-128-10) on digits' test split, and the convolutional
network on 28x28 images made offline from digits (bilinear upsampling of the 8x8 images,
then binarised). Weights are a fixed random initialisation: memory and time do not depend on
the values. Every (network, K, chunking) cell runs in a fresh process, so its peak RSS
(``ru_maxrss``) is its own; the growth is the peak minus the RSS just before scoring (after
imports, the model, the data and a tiny warm-up pass). On CUDA the growth is
``torch.cuda.max_memory_allocated``.

    OMP_NUM_THREADS=1 python benchmarks/eval_memory.py                 # ~10 min on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/eval_memory.py --quick         # K = 100, 1000; fewer points
    python benchmarks/eval_memory.py --device cuda --conv-points 1024
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from ppl_vae.cli import Parser, int_list, run_command
from ppl_vae.training.setup import resolve_device

NETWORKS = ("mlp", "conv")


def _child(net: str, k: int, mode: str, points: int, device: str, budget: str) -> dict:
    import resource

    import pyro
    import torch
    import torch.nn.functional as F

    from ppl_vae import build_vae, load_data
    from ppl_vae.inference.scoring import score

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    dev = torch.device(device)
    torch.manual_seed(0)
    x = load_data("digits").test_x  # (360, 64) in [0, 1]
    if net == "conv":
        x = F.interpolate(x.reshape(-1, 1, 8, 8), size=(28, 28), mode="bilinear")
        x = x.clamp(0, 1)
    x = torch.bernoulli(x[:points], generator=torch.Generator().manual_seed(1))
    if points > x.shape[0]:  # more points than digits has: repeat it
        x = x.repeat((points + x.shape[0] - 1) // x.shape[0], *([1] * (x.dim() - 1)))[:points]
    x = x.to(dev)
    with pyro.settings.context(module_local_params=True):
        vae = build_vae(tuple(x.shape[1:]), network=net).to(dev).eval()
        score(vae, x[:2], num_samples=2, eval_memory=None)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = rss()
        gpu_base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
        pyro.set_rng_seed(0)
        t = time.perf_counter()
        s = score(vae, x, num_samples=k, eval_memory=None if mode == "fixed" else budget)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "net": net,
        "k": k,
        "mode": mode,
        "points": int(x.shape[0]),
        "seconds": seconds,
        "peak_rss": peak,
        "growth": peak - base,
        "plan": s.plan.as_dict() if s.plan else None,
        "log_likelihood": float(s.log_likelihood.mean()),
    }
    if dev.type == "cuda":
        out["gpu_growth"] = torch.cuda.max_memory_allocated() - gpu_base
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", type=int_list, default="100,1000,5000", help="values of K (default 100,1000,5000)")
    p.add_argument("--mlp-points", type=int, default=360, help="digits test points (default all)")
    p.add_argument("--conv-points", type=int, default=128, help="28x28 points (default 128)")
    p.add_argument("--eval-memory", default="512MiB", help="the budget (default 512MiB)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="K = 100, 1000 and 64 conv points")
    p.add_argument("--child", nargs=5, metavar=("NET", "K", "MODE", "POINTS", "DEVICE"))
    args = p.parse_args(argv)
    if args.child:
        net, k, mode, points, device = args.child
        print(json.dumps(_child(net, int(k), mode, int(points), device, args.eval_memory)))
        return
    resolve_device(args.device)  # no CUDA: a one-line error before any child starts
    ks = [100, 1000] if args.quick else args.ks
    points = {"mlp": args.mlp_points, "conv": 64 if args.quick else args.conv_points}
    rows = []
    for net in NETWORKS:
        for k in ks:
            cells = {}
            for mode in ("fixed", "budget"):
                cmd = [sys.executable, __file__, "--eval-memory", args.eval_memory, "--child"]
                cmd += [net, str(k), mode, str(points[net]), args.device]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                cells[mode] = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps(cells[mode]), file=sys.stderr, flush=True)
            rows.append(cells)
    key = "gpu_growth" if args.device == "cuda" else "growth"
    what = "CUDA max allocated" if args.device == "cuda" else "peak RSS growth (peak RSS)"
    print(
        f"\n| network | points | K | fixed 100 x 512: {what}, s | budget {args.eval_memory}: "
        f"{what}, s | budget chunk (particles x points) | log p(x) fixed / budget |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for cells in rows:
        f, b = cells["fixed"], cells["budget"]
        peak = (lambda c: "") if args.device == "cuda" else (lambda c: f" ({_mib(c['peak_rss'])})")
        print(
            f"| {f['net']} | {f['points']} | {f['k']} | {_mib(f[key])}{peak(f)}, "
            f"{f['seconds']:.1f} | {_mib(b[key])}{peak(b)}, {b['seconds']:.1f} | "
            f"{b['plan']['particles']} x {b['plan']['points']} | "
            f"{f['log_likelihood']:.4f} / {b['log_likelihood']:.4f} |"
        )


if __name__ == "__main__":
    sys.exit(run_command("eval_memory.py", main))
