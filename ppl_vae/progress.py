r"""Progress bars of the phases that take a while: tqdm on stderr, shown only on a terminal and
only once the phase has run for :data:`DELAY_SECONDS`.

Every phase uses :func:`progress_bar` (the importance-sampled :math:`\log p(x)` and the ELBO
terms of :mod:`ppl_vae.inference.scoring`, the figures of :mod:`ppl_vae.figures` and
:mod:`ppl_vae.latent_figures`), so ``--quiet`` and a redirected stderr silence them all alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["DELAY_SECONDS", "progress_bar"]

#: A bar appears only once its phase has run this many seconds (a short phase prints nothing).
DELAY_SECONDS = 2.0


@contextmanager
def progress_bar(
    enabled: bool, total: int, what: str, unit: str = "sample", unit_scale: bool = True
) -> Iterator[Any]:
    """A tqdm bar ``what`` over ``total`` ``unit``\\ s on stderr, closed (and cleared) on exit
    (``unit_scale``: counts as 1.2k, 3.4M).

    It shows only with ``enabled``, when stderr is a terminal, and once the work has taken
    :data:`DELAY_SECONDS`; otherwise it is a disabled bar whose ``update`` does nothing.
    """
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        desc=what,
        unit=unit,
        unit_scale=unit_scale,
        delay=DELAY_SECONDS,
        leave=False,
        disable=None if enabled else True,  # None: off when stderr is not a terminal
    )
    try:
        yield bar
    finally:
        bar.close()
