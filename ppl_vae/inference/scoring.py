r"""Evaluation: per-point ELBO and importance-sampled log-likelihood, in nats per data point.

For K samples :math:`z_k \sim q(z \mid x)` with log-weights
:math:`\log w_k = \log p(x, z_k) - \log q(z_k \mid x)`:

.. math:: \mathrm{ELBO}(x) \approx \tfrac1K \sum_k \log w_k, \qquad
          \log p(x) \approx \operatorname{logsumexp}_k \log w_k - \log K \;\ge\; \mathrm{ELBO}.

The K samples are drawn in chunks (a vectorised particle plate of ``chunk_size``) and combined
with a running mean and a running ``logsumexp``, so memory is bounded by one chunk whatever K.
Log-densities are evaluated without any ``poutine.scale`` (the KL weight of training).

Chunks are sized from a memory budget (:func:`plan_chunks`): one pass of k particles over n
points needs :math:`M(k, n) \approx n \max_s(\alpha_s + \beta_s k)` bytes (every tensor is per
point or per (particle, point); the max runs over the moments of the pass), which is convex in k,
so two small probe passes (k = 1 and the widest k the budget allows, on a few points) bound it
for every k in between. The probe measures ``torch.cuda.max_memory_allocated`` on a GPU and, on
a CPU, the peak of the bytes held by the tensors the pass creates (:class:`TensorMemory`).
:func:`per_point_terms` adds the reconstruction term and the KL per latent site (analytic where
Pyro has a closed form for the pair, else Monte Carlo).
"""

from __future__ import annotations

import csv
import math
import re
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import Independent
from torch.overrides import TorchFunctionMode

from ..models.errors import ConfigError
from ..progress import progress_bar
from .estimators import log_importance_weights

#: Memory one evaluation pass may use (bytes): fixed rather than a share of the free memory, so
#: the chunks (and with them the random draws, see :func:`plan_chunks`) are the same on every
#: machine; small beside any laptop's or GPU's memory, and large enough that the default MLP on
#: digits keeps the fixed chunk of 100 particles x 512 points it always had.
DEFAULT_EVAL_MEMORY = 512 * 2**20
#: Points of the probe passes.
PROBE_POINTS = 16
#: On a CPU the tensor count misses what kernels allocate inside an operator (oneDNN's
#: reordered convolution buffers) and the allocator's slack: the RSS growth of a pass was 0.8x
#: the count for the MLP and 1.37x for the convolutional network on 28x28 images
#: (``benchmarks/eval_memory.py``), so the plan budgets this multiple of the count.
CPU_MEMORY_FACTOR = 1.5
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9}
_UNITS |= {"gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_UNITS |= {"tib": 2**40}


def log_weights(
    model: Callable[..., Any], guide: Callable[..., Any], x: torch.Tensor, num_samples: int
) -> torch.Tensor:
    r"""``(num_samples, N)`` log importance weights :math:`\log p(x, z_k) - \log q(z_k|x)`.

    ``model`` and ``guide`` put the batch in ``pyro.plate("data", dim=-1)``; the particles go in
    a plate at dim -2. Unscaled (``poutine.scale`` is ignored), masks honoured; see
    :func:`ppl_vae.inference.estimators.log_likelihood` for the conventions.
    """
    return log_importance_weights(model, guide, (x,), {}, num_samples, 1)


def parse_memory(value: int | str) -> int:
    """A memory size in bytes: an integer, or a number with a unit (``"1GB"`` = 10^9,
    ``"512MiB"`` = 2^29, ``"300 mb"``; kB/MB/GB/TB are decimal, KiB/MiB/GiB/TiB binary)."""
    if isinstance(value, bool):
        raise ConfigError(f"a memory size must be a number of bytes or e.g. '1GB', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ConfigError(
                f"a memory size must be a number of bytes or a number with a unit (e.g. 1GB, "
                f"512MiB), got {value!r}"
            )
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ConfigError(f"a memory size must be positive, got {value!r}")
    return n


def format_memory(n: float) -> str:
    """``n`` bytes as MiB or GiB (for messages and summaries)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class TensorMemory(TorchFunctionMode):
    r"""Peak bytes held at once by the storages of the tensors created inside the mode.

    Tensors that existed before (the data, the parameters) and views of them are not counted;
    a storage counts from the torch function that returns it until the last tensor on it is
    freed. Memory a function uses without returning it (a convolution's workspace, the
    temporaries inside one operator) is not seen. (A ``TorchFunctionMode`` rather than a
    dispatch mode, which counts the same here but imports ``torch._dynamo`` on first use: a
    second and 160 MB.)

    Example::

        with TensorMemory() as mem:
            f(x)
        mem.peak  # bytes
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, int] = {}

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int | None]) -> None:
        key = _storage_key(t)
        if key is None:
            return
        if key not in self._refs:
            if key in inputs:
                return  # a view of a tensor made before the mode
            nbytes = t.untyped_storage().nbytes()
            if nbytes == 0:
                return
            self._refs[key], self._sizes[key] = 0, nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        self._refs[key] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current -= self._sizes.pop(key)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, tuple | list):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):  # sparse, meta or wrapper tensors
        return None


@contextmanager
def _kept_rng(device: torch.device) -> Iterator[None]:
    """Runs the block with every random stream saved and restored (probes draw nothing)."""
    state = pyro.util.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    try:
        yield
    finally:
        pyro.util.set_rng_state(state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def pass_memory(module: Any, x: torch.Tensor, num_particles: int) -> tuple[int, str]:
    """Peak bytes one log-weight pass of ``num_particles`` over the points ``x`` adds (random
    streams restored afterwards), and how they were measured (:func:`peak_memory`)."""
    with torch.no_grad():

        def one_pass() -> None:  # what log_weights runs (called directly: probes are no passes)
            log_importance_weights(module.model, module.guide, (x,), {}, num_particles, 1)

        with _kept_rng(x.device):
            return peak_memory(one_pass, x.device)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int, str]:
    """Peak bytes that running ``fn()`` adds on ``device``, and how they were measured: on a
    GPU, ``torch.cuda.max_memory_allocated`` above what was allocated before (the peak
    statistics are reset first, the device synchronised around the call); on a CPU, the peak
    count of :class:`TensorMemory` times :data:`CPU_MEMORY_FACTOR`, rounded up."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
    with TensorMemory() as mem:
        fn()
    return (
        math.ceil(mem.peak * CPU_MEMORY_FACTOR),
        f"{CPU_MEMORY_FACTOR} x the peak bytes of the tensors a pass creates",
    )


@dataclass(frozen=True)
class ChunkPlan:
    """How one evaluation is cut: ``particles`` x ``points`` per vectorised pass.

    Attributes:
        particles: particles per pass (at most the ``chunk_size`` asked for).
        points: data points per pass (at most the ``batch_size`` asked for).
        budget: the memory budget in bytes, or None for the fixed chunk.
        estimate: the bytes one pass of this size is expected to add (an upper bound from the
            probes), or None.
        measured_by: how the probes measured memory (``"fixed"`` without a budget).
    """

    particles: int
    points: int
    budget: int | None = None
    estimate: int | None = None
    measured_by: str = "fixed"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_chunks(
    module: Any,
    x: torch.Tensor,
    num_samples: int,
    chunk_size: int = 100,
    batch_size: int = 512,
    eval_memory: int | str | None = DEFAULT_EVAL_MEMORY,
) -> ChunkPlan:
    r"""The largest chunk within ``eval_memory``, shrinking particles before points.

    With :math:`c = \min(\text{chunk\_size}, K)` and :math:`B = \min(\text{batch\_size}, N)`,
    two probe passes over :math:`n_0` = :data:`PROBE_POINTS` points measure :math:`P_1 = M(1,
    n_0)` and :math:`P_{k_2} = M(k_2, n_0)` with :math:`k_2 = \min(c, \lfloor b / P_1
    \rfloor)` (so the probe itself stays within the budget b, as :math:`M(k) \le k M(1)`).
    Since M is convex in k and linear in n, the chord :math:`\hat M(k, n) = \tfrac{n}{n_0}
    (P_1 + (P_{k_2} - P_1)\tfrac{k - 1}{k_2 - 1})` bounds it on :math:`[1, k_2]`. The plan is
    :math:`(c, B)` when that fits (then the result is exactly the fixed chunk's), else the
    largest :math:`k \le k_2` with :math:`\hat M(k, B) \le b`, else one particle and the
    largest n that fits.

    Particles are cut first because on a CPU the draws do not change with it: a pass draws
    ``(k, n, D)`` normals in particle-major order and torch's sampler fills blocks of 16, so
    two passes of k/2 draw what one pass of k draws whenever n D is a multiple of 16. Fewer
    points per pass reorders the draws (the estimate changes by Monte Carlo noise only).

    ``eval_memory=None`` gives the fixed ``(chunk_size, batch_size)`` chunk without probing.
    """
    n_all = int(x.shape[0])
    c, b_pts = max(1, min(chunk_size, num_samples)), max(1, min(batch_size, n_all))
    if eval_memory is None or n_all == 0:
        return ChunkPlan(c, b_pts)
    budget = parse_memory(eval_memory)
    n0 = min(PROBE_POINTS, n_all)
    probe = x[:n0]
    p1, how = pass_memory(module, probe, 1)
    p1 = max(p1, 1)
    k2 = max(1, min(c, budget // p1))
    pk2 = max(pass_memory(module, probe, k2)[0], p1) if k2 > 1 else p1

    def bound(k: int, n: int) -> int:
        slope = (pk2 - p1) / (k2 - 1) if k2 > 1 else 0.0
        return math.ceil((p1 + slope * (k - 1)) * n / n0)

    if k2 == c and bound(c, b_pts) <= budget:
        return ChunkPlan(c, b_pts, budget, bound(c, b_pts), how)
    if bound(1, b_pts) <= budget:
        lo, hi = 1, k2  # the largest k with bound(k, B) <= budget (bound grows with k)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if bound(mid, b_pts) <= budget else (lo, mid - 1)
        return ChunkPlan(lo, b_pts, budget, bound(lo, b_pts), how)
    n = max(1, min(b_pts, budget * n0 // p1))
    return ChunkPlan(1, n, budget, bound(1, n), how)


@dataclass
class Scores:
    """Per-point evaluation results (nats)."""

    elbo: torch.Tensor  # (N,)
    log_likelihood: torch.Tensor  # (N,)
    num_samples: int
    plan: ChunkPlan | None = field(default=None, compare=False)

    def summary(self) -> dict[str, float]:
        return {
            "elbo": float(self.elbo.mean()),
            "log_likelihood": float(self.log_likelihood.mean()),
            "log_likelihood_se": float(self.log_likelihood.std() / math.sqrt(len(self.elbo)))
            if len(self.elbo) > 1
            else float("nan"),
        }


def score(
    vae: Any,
    x: torch.Tensor,
    num_samples: int = 1000,
    chunk_size: int = 100,
    batch_size: int = 512,
    eval_memory: int | str | None = DEFAULT_EVAL_MEMORY,
    progress: bool = False,
) -> Scores:
    """Per-point ELBO and importance-sampled log-likelihood of ``x`` under a trained VAE.

    Args:
        vae: a module with ``model(x)`` / ``guide(x)`` Pyro programs (a ``kl_scale`` attribute,
            if it has one, is set to 1 while scoring).
        x: data ``(N, *data_shape)``.
        num_samples: K importance samples per point.
        chunk_size: the most particles drawn at once.
        batch_size: the most data points scored at once.
        eval_memory: memory one pass may add (bytes or e.g. ``"1GB"``); the chunk is cut from
            ``chunk_size * batch_size`` down to fit (:func:`plan_chunks`). None: the fixed
            chunk, unprobed.
        progress: show a progress bar (tqdm, on a terminal only, after 2 s).

    Returns:
        The :class:`Scores`, with the :class:`ChunkPlan` used.
    """
    with torch.no_grad():
        if num_samples <= 0 or chunk_size <= 0 or batch_size <= 0:
            raise ConfigError(
                f"`num_samples`, `chunk_size` and `batch_size` must be positive, got {num_samples}, "
                f"{chunk_size}, {batch_size}"
            )
        with _evaluation_mode(vae):
            plan = plan_chunks(vae, x, num_samples, chunk_size, batch_size, eval_memory)
            elbos, lls = [], []
            with progress_bar(progress, x.shape[0] * num_samples, "log p(x)") as bar:
                for start in range(0, x.shape[0], plan.points):
                    xb = x[start : start + plan.points]
                    run_lse = xb.new_full((xb.shape[0],), -math.inf)
                    run_sum = xb.new_zeros(xb.shape[0])
                    done = 0
                    while done < num_samples:
                        k = min(plan.particles, num_samples - done)
                        lw = log_weights(vae.model, vae.guide, xb, k)
                        run_lse = torch.logaddexp(run_lse, torch.logsumexp(lw, dim=0))
                        run_sum = run_sum + lw.sum(0)
                        done += k
                        bar.update(k * xb.shape[0])
                    elbos.append(run_sum / num_samples)
                    lls.append(run_lse - math.log(num_samples))
        return Scores(torch.cat(elbos), torch.cat(lls), num_samples, plan)


@contextmanager
def _evaluation_mode(module: Any) -> Iterator[None]:
    """Eval mode and a KL weight of 1 (where the module has one) for the block."""
    was_training = module.training
    old_scale = getattr(module, "kl_scale", None)
    module.eval()
    if old_scale is not None:
        module.kl_scale = 1.0
    try:
        yield
    finally:
        if old_scale is not None:
            module.kl_scale = old_scale
        module.train(was_training)


#: The progress bar helper, by its former name (:func:`ppl_vae.progress.progress_bar`).
_progress = progress_bar


@dataclass
class Terms:
    r"""Per-point terms of the ELBO, :math:`\mathrm{ELBO}(x) = \mathrm{recon}(x) -
    \sum_s \mathrm{KL}_s(x)` (nats).

    Attributes:
        recon: :math:`\mathbb{E}_q[\log p(x \mid z)]` ``(N,)``, over ``num_samples`` draws.
        kl: per latent site in the data plate, ``(N,)``: the closed form
            :math:`\mathrm{KL}(q(z_s \mid \cdot) \| p(z_s \mid \mathrm{pa}_s))` averaged over
            the draws of its parents, or the Monte Carlo mean of :math:`\log q - \log p`.
        analytic: per site, whether its KL is the closed form.
        num_samples: draws per point.
    """

    recon: torch.Tensor
    kl: dict[str, torch.Tensor]
    analytic: dict[str, bool]
    num_samples: int

    @property
    def kl_total(self) -> torch.Tensor:
        """The KL summed over sites ``(N,)``."""
        return sum(self.kl.values(), torch.zeros_like(self.recon))


def per_point_terms(
    module: Any,
    x: torch.Tensor,
    num_samples: int = 100,
    plan: ChunkPlan | None = None,
    progress: bool = False,
) -> Terms:
    """The reconstruction term and the KL of every latent site, per point of ``x``.

    Draws ``num_samples`` z per point from the guide (in chunks of ``plan``, default: the
    fixed 100 x 512) and replays the model on them, as :func:`log_weights` does; sites
    outside ``pyro.plate("data")`` (global latents) have no per-point KL and are left out.
    """
    with torch.no_grad():
        if num_samples <= 0:
            raise ConfigError(f"`num_samples` must be positive, got {num_samples}")
        plan = plan or ChunkPlan(min(100, num_samples), 512)
        recon_parts: list[torch.Tensor] = []
        kl_parts: dict[str, list[torch.Tensor]] = {}
        analytic: dict[str, bool] = {}
        with (
            _evaluation_mode(module),
            progress_bar(progress, x.shape[0] * num_samples, "terms") as bar,
        ):
            for start in range(0, x.shape[0], plan.points):
                xb = x[start : start + plan.points]
                recon, kls = xb.new_zeros(xb.shape[0]), {}
                done = 0
                while done < num_samples:
                    k = min(plan.particles, num_samples - done)
                    r, sites = _chunk_terms(module, xb, k)
                    recon = recon + r
                    for name, (value, exact) in sites.items():
                        kls[name] = kls.get(name, 0.0) + value
                        analytic[name] = analytic.get(name, True) and exact
                    done += k
                    bar.update(k * xb.shape[0])
                recon_parts.append(recon / num_samples)
                for name, value in kls.items():
                    kl_parts.setdefault(name, []).append(value / num_samples)
        kl = {name: torch.cat(parts) for name, parts in kl_parts.items()}
        return Terms(torch.cat(recon_parts), kl, analytic, num_samples)


def _chunk_terms(
    module: Any, x: torch.Tensor, k: int
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, bool]]]:
    """Sums over k particles of log p(x|z) ``(n,)`` and of each site's KL ``(n,)``."""
    n = x.shape[0]
    guide = pyro.plate("log_likelihood_particles", k, dim=-2)(module.guide)
    model = pyro.plate("log_likelihood_particles", k, dim=-2)(module.model)
    gt = prune_subsample_sites(poutine.trace(guide).get_trace(x))
    mt = prune_subsample_sites(poutine.trace(poutine.replay(model, trace=gt)).get_trace(x))
    recon = x.new_zeros(n)
    for site in mt.nodes.values():
        if site["type"] == "sample" and site["is_observed"]:
            lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            recon = recon + _per_point(scale_and_mask(lp, 1.0, site["mask"]), k, n, site)
    sites: dict[str, tuple[torch.Tensor, bool]] = {}
    for name, g in gt.nodes.items():
        if g["type"] != "sample" or g["is_observed"] or name not in mt.nodes:
            continue
        if not any(f.name == "data" for f in g["cond_indep_stack"]):
            continue  # a global latent: no per-point KL
        q, p, value = g["fn"], mt.nodes[name]["fn"], g["value"]
        kl = _closed_form_kl(q, p)
        exact = kl is not None
        if kl is None:
            kl = q.log_prob(value) - p.log_prob(value)
        kl = scale_and_mask(kl, 1.0, g["mask"])
        sites[name] = (_per_point(kl, k, n, g), exact)
    return recon, sites


def _per_point(t: torch.Tensor, k: int, n: int, site: dict[str, Any]) -> torch.Tensor:
    """A site's ``(k, n)``-broadcastable term summed over the particles: ``(n,)``."""
    if t.dim() > 2:
        raise ConfigError(
            f"site {site['name']!r} has batch shape {tuple(t.shape)}; per-point terms need its "
            "batch dims to be pyro.plate('data') at dim -1 only (declare the rest with to_event)"
        )
    return torch.broadcast_to(t, (k, n)).sum(0)


def _closed_form_kl(q: Any, p: Any) -> torch.Tensor | None:
    """The closed-form KL per batch element of two site distributions, or None if Pyro has
    none for the pair (also tried on the distributions under ``Independent``/``expand``)."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        pass
    qb, pb = _strip(q), _strip(p)
    if qb is q and pb is p:
        return None
    try:
        kl = kl_divergence(qb, pb)
    except NotImplementedError:
        return None
    # kl has the base batch shape: q's batch shape plus the dims Independent reinterpreted
    extra = len(q.event_shape) - len(qb.event_shape)
    if len(pb.event_shape) != len(qb.event_shape) or extra < 0:
        return None
    full = q.batch_shape + q.event_shape[:extra]
    try:
        kl = torch.broadcast_to(kl, full)
    except RuntimeError:
        return None
    return kl.sum(tuple(range(-extra, 0))) if extra else kl


def _strip(d: Any) -> Any:
    while isinstance(d, Independent | ExpandedDistribution):
        d = d.base_dist
    return d


def bits_per_dim(likelihood: Any, log_likelihood: float, num_levels: int | None) -> float | None:
    r"""Bits per dimension of a per-point log-likelihood, where the convention is defined.

    For a probability mass function (a likelihood with discrete support) it is
    :math:`-\log p(x) / (D \ln 2)`; for a density on data quantised to ``num_levels`` levels and
    scaled to [0, 1], the change of variables to the integer grid adds :math:`\log_2(L - 1)`
    per dimension (see :func:`ppl_vae.models.likelihoods.units.bits_per_dim`). None otherwise.
    """
    from ..models.likelihoods.units import bits_per_dim as _bpd

    dims = int(torch.Size(likelihood.data_shape).numel())
    if likelihood.support.is_discrete:
        return _bpd(-log_likelihood, dims, None)
    if num_levels is not None and num_levels > 1:
        return _bpd(-log_likelihood, dims, num_levels)
    return None


def mean_elbo(vae: Any, x: torch.Tensor, batch_size: int = 512) -> float:
    """The ELBO per data point of ``x`` with one sample per point (for per-epoch validation)."""
    with torch.no_grad():
        # one particle per point, a training-sized pass: the fixed chunk, no probe every epoch
        one = score(vae, x, num_samples=1, chunk_size=1, batch_size=batch_size, eval_memory=None)
        return float(one.elbo.mean())


def write_scores_csv(
    path: Path,
    scores: Scores,
    labels: torch.Tensor | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Per-point scores: ``index,label,elbo,log_likelihood`` (higher = more typical)."""
    from ..config import write_text_atomic

    rows = [["index", "label", "elbo", "log_likelihood"]]
    elbo = scores.elbo.cpu().tolist()
    ll = scores.log_likelihood.cpu().tolist()
    lab = labels.cpu().tolist() if labels is not None else [""] * len(elbo)
    for i, (e, l_, y) in enumerate(zip(elbo, ll, lab, strict=True)):
        rows.append([str(i), str(y), f"{e:.6f}", f"{l_:.6f}"])
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    write_text_atomic(path, buf.getvalue())
