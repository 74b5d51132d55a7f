r"""The optimiser every training loop uses: Adam, with PyTorch's fused kernel where it runs.

``torch.optim.Adam`` with default arguments takes the per-tensor ("for-loop") implementation on
the CPU: about ten elementwise kernels per parameter tensor per step. ``fused=True`` (CPU and
CUDA, torch >= 2.4) does the same update in one kernel per tensor. The update is Adam's,

.. math:: m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
    \quad \theta \leftarrow \theta - \eta\,\frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon},

equal to the for-loop one up to float rounding (``tests/test_optim.py``). Measured on one CPU
thread with the benchmark's networks (``python benchmarks/speed.py``): 0.28 ms -> 0.10 ms per
step at 64 dimensions, 1.2-1.6 ms -> 0.35 ms at 784.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["make_adam"]


def make_adam(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam at learning rate ``lr``, fused where this torch build and the parameters allow.

    Falls back to the default implementation where fused Adam is unavailable (older torch, a
    device or dtype without the kernel): the update is the same, only slower.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)
