r"""Figures of a run, written with matplotlib's object API (no pyplot, no global state).

``elbo.png`` (training curves), ``reconstructions.png`` (test points and the likelihood's mean
given their codes, or draws from it with ``draws=True``), ``samples.png`` (decoded prior samples), ``latent.png`` (posterior means
coloured by label, PCA-projected when D > 2), ``interpolation.png`` (decoded codes on the
prior's path between two test points), plus the prior's own geometry figures and the latent
space's traversals, posterior histograms and KL per dimension (:mod:`ppl_vae.latent_figures`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .progress import progress_bar

if TYPE_CHECKING:
    from .ssl import SSLResult


def new_figure(*args: Any, **kwargs: Any) -> Figure:
    """A matplotlib figure on its own Agg canvas (no pyplot state)."""
    fig = Figure(*args, **kwargs)
    FigureCanvasAgg(fig)
    return fig


_figure = new_figure


def as_images(x: torch.Tensor, image_shape: tuple[int, ...] | None) -> np.ndarray:
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


_as_images = as_images


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
    result: Any, test_x: torch.Tensor, n: int = 10, draws: bool = False, progress: bool = False
) -> list[Path]:
    """All figures of a finished :class:`~ppl_vae.train.FitResult` into ``run_dir/figures``;
    ``progress``: a ``"figures"`` bar over them (:func:`~ppl_vae.progress.progress_bar`: on a
    terminal only, after 2 s; the prior's own figures count as one)."""
    steps = 6 if test_x.shape[0] >= 2 else 5
    with progress_bar(progress, steps, "figures", "figure", unit_scale=False) as bar:
        return _write_figures(result, test_x, n, draws, bar)


def _write_figures(result: Any, test_x: torch.Tensor, n: int, draws: bool, bar: Any) -> list[Path]:
    vae, ds = result.vae, result.dataset
    fig_dir = Path(result.run_dir) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    was_training = vae.training
    vae.eval()
    paths = [elbo_curve(fig_dir / "elbo.png", result.history, result.metrics.get("test_elbo"))]
    bar.update()
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
    bar.update()
    samples = show(vae.prior().sample((4 * n,)))
    imgs = _as_images(samples, ds.image_shape)
    paths.append(
        image_grid(
            fig_dir / "samples.png",
            [imgs[i * n : (i + 1) * n] for i in range(4)],
            suptitle=f"decoded prior samples ({what})",
        )
    )
    bar.update()
    z = vae.posterior_mean(test_x[:2000])
    labels = ds.test_y[:2000] if ds.test_y is not None else None
    paths.append(latent_scatter(fig_dir / "latent.png", z, labels))
    bar.update()
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
        bar.update()
    paths += [
        Path(p)
        for p in vae.prior.figures(
            vae.codes(test_x[:2000]).cpu(), labels.cpu() if labels is not None else None, fig_dir
        )
    ]
    bar.update()
    from .latent_figures import vae_view, write_latent_figures

    view = vae_view(vae, test_x, ds.image_shape)
    paths += write_latent_figures(fig_dir, view, result.history, bar=bar).paths
    vae.train(was_training)
    return paths


# -- M2 (semi-supervised) runs ------------------------------------------------------------


def confusion_figure(path: Path, confusion: np.ndarray, names: list[str], title: str) -> Path:
    """The confusion matrix (rows: true class, columns: predicted), counts in the cells."""
    k = confusion.shape[0]
    fig = _figure(figsize=(1.0 + 0.5 * k, 0.8 + 0.5 * k))
    ax = fig.add_subplot(1, 1, 1)
    totals = np.maximum(confusion.sum(1, keepdims=True), 1)
    im = ax.imshow(confusion / totals, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if confusion[i, j]:
                colour = "white" if confusion[i, j] / totals[i, 0] > 0.5 else "black"
                ax.text(
                    j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7, color=colour
                )
    ax.set_xticks(range(k), names, fontsize=7, rotation=90 if max(map(len, names)) > 2 else 0)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def accuracy_figure(
    path: Path, history: list[dict[str, float]], baseline_history: list[dict[str, float]]
) -> Path:
    """Validation accuracy per epoch (and the baseline's), and the training losses."""
    fig = _figure(figsize=(10, 4))
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(
        [h["epoch"] for h in history], [h["val_accuracy"] for h in history], label="M2: validation"
    )
    ax.plot(
        [h["epoch"] for h in history],
        [h["labelled_accuracy"] for h in history],
        ls=":",
        label="M2: labelled training points",
    )
    if baseline_history:
        ax.plot(
            [h["epoch"] for h in baseline_history],
            [h["val_accuracy"] for h in baseline_history],
            label="supervised baseline: validation",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    epochs = [h["epoch"] for h in history]
    for key, label in (
        ("labelled_loss", "-L(x, y) per labelled point"),
        ("unlabelled_loss", "-U(x) per unlabelled point"),
    ):
        values = [h[key] for h in history]
        if any(math.isfinite(v) for v in values):
            ax.plot(epochs, values, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per point (training estimate)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


@torch.no_grad()
def write_ssl_figures(
    result: SSLResult,
    test_x: torch.Tensor,
    pred: torch.Tensor,
    confusion: np.ndarray,
    n: int = 6,
    progress: bool = False,
) -> list[Path]:
    """Confusion matrix, style/content grids and accuracy curves into ``run_dir/figures``;
    ``progress``: a ``"figures"`` bar over them (on a terminal only, after 2 s)."""
    steps = 5 + (result.baseline is not None)
    with progress_bar(progress, steps, "figures", "figure", unit_scale=False) as bar:
        return _write_ssl_figures(result, test_x, pred, confusion, n, bar)


def _write_ssl_figures(
    result: SSLResult,
    test_x: torch.Tensor,
    pred: torch.Tensor,
    confusion: np.ndarray,
    n: int,
    bar: Any,
) -> list[Path]:
    from .kinds.m2 import confusion_counts

    model, ds = result.model, result.dataset
    assert result.run_dir is not None
    fig_dir = Path(result.run_dir) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    k = model.num_classes
    names = list(ds.class_names or [str(i) for i in range(k)])
    model.eval()
    acc = result.metrics["test_accuracy"]
    paths = [
        confusion_figure(fig_dir / "confusion.png", confusion, names, f"M2 test accuracy {acc:.3f}")
    ]
    bar.update()
    if result.baseline is not None:
        b_pred = result.baseline.predict(test_x)
        b_conf = confusion_counts(b_pred, ds.test_y, k)
        b_acc = result.metrics["baseline_test_accuracy"]
        paths.append(
            confusion_figure(
                fig_dir / "confusion_baseline.png",
                b_conf,
                names,
                f"supervised baseline {b_acc:.3f}",
            )
        )
        bar.update()
    eye = torch.eye(k, dtype=test_x.dtype, device=test_x.device)
    # Style from test points: z = E[q(z | x, predicted y)], then every class with that z.
    x = test_x[:n]
    z = model.posterior_mean(x, pred[:n])
    rows, titles = [], []
    for i in range(len(x)):
        imgs = model.decode_mean(z[i].expand(k, -1), eye)
        rows.append(_as_images(torch.cat([x[i : i + 1], imgs]), ds.image_shape))
        titles.append(f"test point {i}, predicted {names[int(pred[i])]}")
    paths.append(
        image_grid(
            fig_dir / "style_content.png",
            rows,
            titles,
            suptitle=(
                "style z = E[q(z | x, predicted y)] of a test point x (first column), "
                f"then y = {', '.join(names)}"
            ),
        )
    )
    bar.update()
    # Style from the prior: z ~ p(z) fixed along a row (p(z | y): z ~ p(z | y) per entry), y
    # varies along it.
    codes = model.prior_codes(n).to(eye)  # (K, n, D)
    rows = [_as_images(model.decode_mean(codes[:, i], eye), ds.image_shape) for i in range(n)]
    how = "z ~ p(z | y) per image" if model.prior.label_conditional else "z ~ p(z) fixed per row"
    paths.append(
        image_grid(
            fig_dir / "class_samples.png",
            rows,
            suptitle=f"{how}; classes {', '.join(names)} along it (means)",
        )
    )
    bar.update()
    paths.append(accuracy_figure(fig_dir / "accuracy.png", result.history, result.baseline_history))
    bar.update()
    # Geometry figures of the prior, from codes of test points.
    zs = model.posterior_mean(test_x[:2000], pred[:2000])
    labels = ds.test_y[:2000]
    paths += [Path(p) for p in model.prior.figures(zs.cpu(), labels.cpu(), fig_dir)]
    bar.update()
    from .latent_figures import m2_view, write_latent_figures

    view = m2_view(model, test_x, pred, ds.image_shape)
    paths += write_latent_figures(fig_dir, view, result.history, bar=bar).paths
    return paths
