r"""Tiny data sets written in the real on-disk formats, where the real loaders look for them.

- :func:`write_idx_fixture`: MNIST / Fashion-MNIST IDX files (magic 2051 for images, 2049 for
  labels, big-endian sizes, uint8 payload) in ``ROOT/<ClassName>/raw/``, the folder
  ``torchvision.datasets.MNIST`` reads.
- :func:`write_svhn_fixture`: SVHN ``.mat`` files (``X`` uint8 ``(32, 32, 3, N)``, ``y``
  ``(N, 1)`` with 10 meaning the digit 0) in ``ROOT/SVHN/``, where :func:`ppl_vae.data.load_data`
  reads them.

Both return the arrays they wrote, in the layout :func:`ppl_vae.data.load_data` returns
(``(N, C, H, W)`` uint8 images, digit labels 0..9), so tests can compare values exactly.
Every image is distinct (its first pixels encode its index), so a loaded point can be matched
back to the one written.

Example (in a test taking pytest's ``tmp_path``)::

    from tests.fixtures import write_idx_fixture

    arrays = write_idx_fixture(tmp_path, "MNIST", n_train=30, n_test=10)
    data = load_data("mnist", root=tmp_path)  # data.test_x * 255 == arrays["test_x"]
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import scipy.io

__all__ = ["IDX_FILES", "write_idx_fixture", "write_svhn_fixture"]

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...], offset: int) -> np.ndarray:
    """Random uint8 images whose first two pixels spell ``offset + index`` (so all distinct)."""
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = x.reshape(n, -1)
    index = np.arange(offset, offset + n)
    flat[:, 0] = index // 256
    flat[:, 1] = index % 256
    return x


def _labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """Every class equally often (as far as n allows), shuffled."""
    return rng.permutation(np.arange(n) % 10).astype(np.int64)


def _write_idx(path: Path, array: np.ndarray, magic: int, compress: bool) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_idx_fixture(
    root: str | os.PathLike,
    cls_name: str,
    n_train: int,
    n_test: int,
    *,
    compressed: bool = False,
    side: int = 28,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    r"""Write MNIST-format IDX files into ``root/cls_name/raw/``.

    Args:
        root: the data root passed to ``load_data(..., root=root)``.
        cls_name: torchvision's class name, the folder it reads: ``"MNIST"`` or
            ``"FashionMNIST"``.
        n_train: images in ``train-images-idx3-ubyte``.
        n_test: images in ``t10k-images-idx3-ubyte``.
        compressed: write only the ``.gz`` archives (as downloaded) instead of the extracted files.
        side: image height and width.
        seed: seed of the random pixels and label order.

    Returns:
        ``train_x`` ``(n_train, 1, side, side)`` uint8, ``train_y`` ``(n_train,)`` int64 and the
        same for ``test_x``, ``test_y``.
    """
    if n_train + n_test > 65536:
        raise ValueError("fixtures index images with two pixels: at most 65536 images")
    raw = Path(root) / cls_name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for split, prefix, n, offset in (
        ("train", "train", n_train, 0),
        ("test", "t10k", n_test, n_train),
    ):
        x = _images(rng, n, (side, side), offset)
        y = _labels(rng, n)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x, 2051, compressed)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y.astype(np.uint8), 2049, compressed)
        out[f"{split}_x"] = x[:, None]
        out[f"{split}_y"] = y
    return out


def write_svhn_fixture(
    root: str | os.PathLike,
    n_train: int,
    n_test: int,
    n_extra: int = 0,
    *,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    r"""Write SVHN-format ``.mat`` files into ``root/SVHN/``.

    Each file holds ``X``, uint8 ``(32, 32, 3, N)`` (height, width, channel, index), and ``y``,
    uint8 ``(N, 1)`` with labels 1..10, 10 standing for the digit 0 — SVHN's own layout.
    ``extra_32x32.mat`` is written only when ``n_extra > 0``.

    Args:
        root: the data root passed to ``load_data(..., root=root)``.
        n_train: images in ``train_32x32.mat``.
        n_test: images in ``test_32x32.mat``.
        n_extra: images in ``extra_32x32.mat``.
        seed: seed of the random pixels and label order.

    Returns:
        For each split written (``train``, ``test``, ``extra``): ``<split>_x`` uint8
        ``(N, 3, 32, 32)``, ``<split>_y`` int64 digit labels 0..9, and ``<split>_y_raw`` the
        labels as stored in the file (10 for the digit 0).
    """
    if n_train + n_test + n_extra > 65536:
        raise ValueError("fixtures index images with two pixels: at most 65536 images")
    folder = Path(root) / "SVHN"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    offset = 0
    for split, n in (("train", n_train), ("test", n_test), ("extra", n_extra)):
        if split == "extra" and n == 0:
            continue
        x = _images(rng, n, (3, 32, 32), offset)  # (N, C, H, W)
        offset += n
        y = _labels(rng, n)
        y_raw = np.where(y == 0, 10, y)
        mat_x = np.ascontiguousarray(np.transpose(x, (2, 3, 1, 0)))  # (H, W, C, N)
        scipy.io.savemat(
            str(folder / f"{split}_32x32.mat"),
            {"X": mat_x, "y": y_raw.astype(np.uint8)[:, None]},
        )
        out[f"{split}_x"] = x
        out[f"{split}_y"] = y
        out[f"{split}_y_raw"] = y_raw
    return out
