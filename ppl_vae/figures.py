r"""Figures of a run, written with matplotlib's object API (no pyplot, no global state).

``elbo.png`` (training curves), ``reconstructions.png`` (test points and the likelihood's mean
given their codes, or draws from it with ``draws=True``), ``samples.png`` (decoded prior samples), ``latent.png`` (posterior means
coloured by label, PCA-projected when D > 2), ``interpolation.png`` (decoded codes on the
prior's path between two test points), plus the prior's own geometry figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(*args: Any, **kwargs: Any) -> Figure:
    fig = Figure(*args, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _as_images(x: torch.Tensor, image_shape: tuple[int, ...] | None) -> np.ndarray:
    """``(N, *data_shape)`` -> ``(N, H, W)`` or ``(N, H, W, 3)`` in [0, 1] for display."""
    x = x.detach().float().cpu()
    n = x.shape[0]
    if image_shape is None:
        d = int(np.prod(x.shape[1:]))
        img = x.reshape(n, 1, 1, d)
    else:
        img = x.reshape(n, *image_shape)
    lo, hi = float(img.min()), float(img.max())
    if lo < 0 or hi > 1:
        img = (img - lo) / max(hi - lo, 1e-8)
    arr = img.numpy()
    return arr[:, 0] if arr.shape[1] == 1 else np.transpose(arr, (0, 2, 3, 1))


def image_grid(
    path: Path, rows: list[np.ndarray], titles: list[str] | None = None, suptitle: str = ""
) -> Path:
    """Write rows of images (each ``(n, H, W[, 3])``) as one grid."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig = _figure(figsize=(max(4.0, 0.9 * n_cols), 0.95 * n_rows + 0.6))
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = fig.add_subplot(n_rows, n_cols, i * n_cols + j + 1)
            ax.set_axis_off()
            if j < len(row):
                ax.imshow(row[j], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if j == 0 and titles:
                ax.set_title(titles[i], fontsize=8, loc="left")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.savefig(path, dpi=100)
    return path


def elbo_curve(path: Path, history: list[dict[str, float]], test_elbo: float | None = None) -> Path:
    fig = _figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [-h["train_loss"] for h in history], label="train objective (per point)")
    ax.plot(epochs, [h["val_elbo"] for h in history], label="validation ELBO (per point)")
    if test_elbo is not None:
        ax.axhline(test_elbo, color="gray", ls="--", lw=1, label=f"test ELBO {test_elbo:.2f}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per data point")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def latent_scatter(path: Path, z: torch.Tensor, labels: torch.Tensor | None) -> Path:
    """Posterior means in 2-D (PCA projection when D > 2), coloured by label."""
    zn = z.detach().float().cpu().numpy()
    keep = np.isfinite(zn).all(axis=1)
    zn = zn[keep]
    if labels is not None:
        labels = labels[torch.as_tensor(keep)]
    title = "posterior means"
    if zn.shape[1] > 2:
        centred = zn - zn.mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        zn = centred @ vt[:2].T
        explained = (s[:2] ** 2).sum() / max((s**2).sum(), 1e-12)
        title += f" (PCA, {100 * explained:.0f}% of variance)"
    elif zn.shape[1] == 1:
        zn = np.concatenate([zn, np.zeros_like(zn)], axis=1)
    fig = _figure(figsize=(5.5, 5))
    ax = fig.add_subplot(1, 1, 1)
    c = labels.cpu().numpy() if labels is not None else None
    sc = ax.scatter(zn[:, 0], zn[:, 1], c=c, cmap="tab10", s=6, alpha=0.8)
    if c is not None:
        fig.colorbar(sc, ax=ax, label="label")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


@torch.no_grad()
def write_figures(
    result: Any, test_x: torch.Tensor, n: int = 10, draws: bool = False
) -> list[Path]:
    """All figures of a finished :class:`~ppl_vae.train.FitResult` into ``run_dir/figures``."""
    vae, ds = result.vae, result.dataset
    fig_dir = Path(result.run_dir) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    was_training = vae.training
    vae.eval()
    paths = [elbo_curve(fig_dir / "elbo.png", result.history, result.metrics.get("test_elbo"))]
    x = test_x[:n]

    def show(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z).sample() if draws else vae.decode_mean(z)

    what = "draw from p(x|z)" if draws else "likelihood mean"
    recon = show(vae.posterior_mean(x))
    paths.append(
        image_grid(
            fig_dir / "reconstructions.png",
            [_as_images(x, ds.image_shape), _as_images(recon, ds.image_shape)],
            ["test data", f"reconstruction ({what})"],
        )
    )
    samples = show(vae.prior().sample((4 * n,)))
    imgs = _as_images(samples, ds.image_shape)
    paths.append(
        image_grid(
            fig_dir / "samples.png",
            [imgs[i * n : (i + 1) * n] for i in range(4)],
            suptitle=f"decoded prior samples ({what})",
        )
    )
    z = vae.posterior_mean(test_x[:2000])
    labels = ds.test_y[:2000] if ds.test_y is not None else None
    paths.append(latent_scatter(fig_dir / "latent.png", z, labels))
    if test_x.shape[0] >= 2:
        t = torch.linspace(0, 1, n, device=z.device, dtype=z.dtype)
        path_z = vae.prior.interpolate(z[0], z[1], t)
        paths.append(
            image_grid(
                fig_dir / "interpolation.png",
                [_as_images(show(path_z), ds.image_shape)],
                ["test point 0 -> test point 1"],
            )
        )
    paths += [
        Path(p)
        for p in vae.prior.figures(
            vae.codes(test_x[:2000]).cpu(), labels.cpu() if labels is not None else None, fig_dir
        )
    ]
    vae.train(was_training)
    return paths
