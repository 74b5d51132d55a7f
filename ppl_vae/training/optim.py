r"""The optimiser every training loop uses: Adam, with PyTorch's fused kernel where it runs.

``torch.optim.Adam`` with default arguments takes the per-tensor ("for-loop") implementation on
the CPU: about ten elementwise kernels per parameter tensor per step. ``fused=True`` (CPU and
CUDA, torch >= 2.4) does the same update in one kernel per tensor. The update is Adam's,

.. math:: m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,
    \quad \theta \leftarrow \theta - \eta\,\frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon},

equal to the for-loop one up to float rounding (``tests/test_optim.py``). Measured on one CPU
thread, ``optimizer.step()`` alone on the parameters of ``benchmarks/speed.py``'s networks
(D -> 400 -> 2 x 20, 20 -> 400 -> D; mean of 500 steps): 0.28 -> 0.10 ms at D = 64,
1.2-1.6 -> 0.35 ms at D = 784. Whole training steps: the "hand, fused Adam" row of
``benchmarks/speed.py`` (1.12-1.17x the same loop with the default Adam in an earlier session, 1.16-1.47x
in the latest, on a loaded machine; README, "Performance").
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
