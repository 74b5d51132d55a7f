r"""Data sets: scikit-learn's bundled digits, MNIST, Fashion-MNIST, SVHN, files and arrays.

Everything comes back as one :class:`Dataset` of float32 tensors split into train, validation
and test, with the splits fixed by ``seed``. Nothing is ever downloaded unless
``download=True`` is passed (``--download`` on the command line).

Sources (``data=``), and the shape of one point:

- ``"digits"``: ``sklearn.datasets.load_digits`` (bundled, offline), values 0..16; ``(64,)``.
- ``"mnist"``, ``"fashion-mnist"``: torchvision's ``MNIST`` / ``FashionMNIST`` reading the IDX
  files in ``ROOT/MNIST/raw`` / ``ROOT/FashionMNIST/raw``; ``(1, 28, 28)``.
- ``"svhn"``: ``train_32x32.mat``, ``test_32x32.mat`` (and ``extra_32x32.mat``) in
  ``ROOT/SVHN``; ``(3, 32, 32)``.
- a path: ``.npy`` (an array ``(N, ...)``) or ``.npz`` (``x``, optional ``y``); inferred.
- an array: ``numpy.ndarray`` or ``torch.Tensor`` ``(N, ...)``; inferred.

``ROOT`` is the ``root`` argument, else the environment variable ``PPL_VAE_DATA``, else
``~/.cache/ppl_vae``.

Example:
    >>> data = load_data("digits", seed=0)
    >>> data.train_x.shape, data.num_levels
    (torch.Size([1294, 64]), 17)
"""

from __future__ import annotations

import difflib
import gzip
import math
import os
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .models.errors import ConfigError

__all__ = ["DATASETS", "Dataset", "default_root", "load_data"]

DATASETS = ("digits", "mnist", "fashion-mnist", "svhn")

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
}
_BINARIZE = ("none", "static")
_DOWNLOAD_HINT = "pass --download (download=True; needs internet)"

# torchvision's class names, kept here so labels can be named without importing torchvision.
_CLASS_NAMES = {
    "digits": tuple(str(k) for k in range(10)),
    "mnist": tuple(str(k) for k in range(10)),
    "fashion-mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "svhn": tuple(str(k) for k in range(10)),
}
_MNIST_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}


@dataclass(eq=False)
class Dataset:
    r"""A data set split into train, validation and test tensors.

    Attributes:
        name: the data set's name (``"digits"``, ``"mnist"``, ...), the file's name, or
            ``"array"``.
        train_x: training points, float32 ``(N, *data_shape)``; likewise ``val_x``, ``test_x``.
        train_y: int64 class labels ``(N,)`` or ``None``; likewise ``val_y``, ``test_y``.
        data_shape: shape of one point: ``(D,)`` for flat data, ``(C, H, W)`` for images.
        image_shape: ``(C, H, W)`` used to display one point (digits' ``(64,)`` is shown as
            ``(1, 8, 8)``), or ``None`` when the data are not images.
        num_classes: number of classes, or ``None`` without labels.
        num_levels: number of evenly spaced values in [0, 1] the data take (17 for digits,
            256 for 8-bit images, 2 after binarisation), or ``None`` if continuous/unknown.
        binarized: ``"none"`` or ``"static"``.
        source: where the data came from (a path, ``sklearn.datasets.load_digits``, ...).
        class_names: a name per class, or ``None``.
        seed: the seed that fixed the splits (and the static binarisation).
        stratified: whether the splits were stratified by label.
    """

    name: str
    train_x: torch.Tensor
    val_x: torch.Tensor
    test_x: torch.Tensor
    train_y: torch.Tensor | None
    val_y: torch.Tensor | None
    test_y: torch.Tensor | None
    data_shape: tuple[int, ...]
    image_shape: tuple[int, int, int] | None
    num_classes: int | None
    num_levels: int | None
    binarized: str = "none"
    source: str = ""
    class_names: tuple[str, ...] | None = None
    seed: int | None = None
    stratified: bool = False

    _TENSORS: ClassVar[tuple[str, ...]] = (
        "train_x",
        "val_x",
        "test_x",
        "train_y",
        "val_y",
        "test_y",
    )

    def to(self, device: torch.device | str) -> Dataset:
        r"""Return a copy with every tensor on ``device``.

        Args:
            device: the target device.

        Returns:
            A new :class:`Dataset`; this one is left unchanged.
        """
        moved: dict[str, Any] = {}
        for name in self._TENSORS:
            value = getattr(self, name)
            moved[name] = None if value is None else value.to(device)
        return replace(self, **moved)

    def describe(self) -> dict[str, Any]:
        r"""A JSON-able summary: name, source, split sizes, shapes, classes, levels.

        Returns:
            A dict of plain Python values (str, int, bool, list, None).
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in self._TENSORS:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["sizes"] = {
            "train": int(self.train_x.shape[0]),
            "val": int(self.val_x.shape[0]),
            "test": int(self.test_x.shape[0]),
        }
        out["labelled"] = {
            "train": self.train_y is not None,
            "val": self.val_y is not None,
            "test": self.test_y is not None,
        }
        return out


def default_root() -> Path:
    r"""Where named torchvision data sets live: ``$PPL_VAE_DATA``, else ``~/.cache/ppl_vae``."""
    env = os.environ.get("PPL_VAE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ppl_vae"


# --------------------------------------------------------------------------------------------
# the public entry point
# --------------------------------------------------------------------------------------------


def load_data(
    data: str | os.PathLike | np.ndarray | torch.Tensor = "digits",
    *,
    test_data: str | os.PathLike | np.ndarray | torch.Tensor | None = None,
    labels: np.ndarray | torch.Tensor | None = None,
    root: str | os.PathLike | None = None,
    download: bool = False,
    binarize: str = "none",
    flatten: bool | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    seed: int = 0,
    svhn_extra: bool = False,
) -> Dataset:
    r"""Load a named data set, a ``.npy``/``.npz`` file or an array, split by ``seed``.

    Splits. A source without its own test split (digits, files and arrays without
    ``test_data``) first gives ``round(test_fraction * N)`` of its N points to the test set;
    then ``round(val_fraction * M)`` of the M training points left (the source's own training
    split for MNIST, Fashion-MNIST, SVHN and ``test_data``) become the validation set. Splits use
    ``sklearn.model_selection.train_test_split`` with ``random_state=seed``, stratified by
    label when there are labels and every class can be stratified (else a plain random
    split; see :attr:`Dataset.stratified`). ``max_train`` then keeps the first ``max_train``
    points of the (shuffled) training split; validation and test sets do not change with it.

    Values. Digits' 0..16 are divided by 16 (17 levels); 8-bit images (MNIST, SVHN, and any
    ``uint8`` array or file) by 255 (256 levels); booleans become 0/1 (2 levels); other
    arrays are kept as they are, as float32, with ``num_levels=None``.

    Shapes of arrays and files. ``(N, D)`` is flat; ``(N, H, W)`` becomes ``(N, 1, H, W)``;
    ``(N, C, H, W)`` is kept, unless ``C`` is not 1 or 3 while the last axis is, in which case
    it is read as channels-last ``(N, H, W, C)`` and transposed. A flat array whose length is a
    perfect square ``s*s >= 16`` is displayed as a ``(1, s, s)`` image.

    Static binarisation replaces every value :math:`x \in [0, 1]` by one Bernoulli draw,
    :math:`b \sim \mathrm{Bernoulli}(x)`, made once from ``seed`` (a separate NumPy stream
    per split, so the test set does not depend on ``max_train``). Dynamic binarisation
    (a fresh draw every batch) belongs to training, not to loading.

    SVHN. torchvision's ``SVHN`` checks the md5 sum of the whole ``.mat`` file each time it
    loads, so with ``download=False`` the files are read here with ``scipy.io.loadmat``
    exactly as torchvision reads them (``X`` ``(32, 32, 3, N)`` transposed to
    ``(N, 3, 32, 32)``, label 10 meaning digit 0 mapped to 0); with ``download=True``
    torchvision downloads, verifies and reads them. ``svhn_extra=True`` appends the 531,131
    ``extra`` images to the training split (about 6.5 GB as float32).

    MNIST and Fashion-MNIST are read by torchvision's loaders from the extracted IDX files in
    ``ROOT/MNIST/raw`` (``ROOT/FashionMNIST/raw``); when only the ``.gz`` archives are there,
    they are decompressed in place first, as torchvision's own download does.

    Args:
        data: a name in :data:`DATASETS`, a path to a ``.npy``/``.npz`` file, or an array /
            tensor of shape ``(N, ...)``. Names take precedence over files of the same name.
        test_data: a separate test set (file or array) with the same per-point shape as
            ``data``; only for files and arrays.
        labels: integer class labels ``(N,)`` for ``data`` when it is a ``.npy`` file or an
            array (a ``.npz`` file carries its own ``y``).
        root: directory of the torchvision data sets (default :func:`default_root`).
        download: allow torchvision to download a missing named data set.
        binarize: ``"none"`` or ``"static"``.
        flatten: ``None`` keeps each source's natural shape (digits flat, images
            ``(C, H, W)``); ``True`` flattens to ``(D,)``; ``False`` keeps images as
            ``(C, H, W)`` (digits become ``(1, 8, 8)``).
        val_fraction: fraction of the available training points kept for validation,
            in [0, 1).
        test_fraction: fraction of all points kept for testing when the source has no test
            split, in (0, 1).
        max_train: keep at most this many training points (quick runs, tests).
        seed: fixes the splits and the static binarisation.
        svhn_extra: append SVHN's ``extra`` split to its training split.

    Returns:
        The :class:`Dataset`, on the CPU.

    Raises:
        ConfigError: unknown name or missing file, a named data set that is not on disk (and
            ``download=False``), an unreadable file, empty data, NaN/inf values, bad labels,
            a ``test_data`` shape that differs from ``data``'s, or bad arguments.
    """
    _check_arguments(binarize, flatten, val_fraction, test_fraction, max_train, seed)
    name = _dataset_name(data)
    if name is not None:
        for arg, value in (("test_data", test_data), ("labels", labels)):
            if value is not None:
                raise ConfigError(
                    f"`{arg}` is for files and arrays; data set '{name}' brings its own "
                    f"{'test split' if arg == 'test_data' else 'labels'}, got {arg} as well"
                )
        if svhn_extra and name != "svhn":
            raise ConfigError(f"`svhn_extra` applies to data set 'svhn' only, got data='{name}'")
        raw = _load_named(name, root, download, svhn_extra)
    else:
        if svhn_extra:
            raise ConfigError("`svhn_extra` applies to data set 'svhn' only, got a file or array")
        raw = _load_custom(data, test_data, labels)
    return _finish(raw, binarize, flatten, val_fraction, test_fraction, max_train, seed)


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------


def _check_arguments(
    binarize: str,
    flatten: bool | None,
    val_fraction: float,
    test_fraction: float,
    max_train: int | None,
    seed: int,
) -> None:
    if binarize not in _BINARIZE:
        extra = ""
        if binarize == "dynamic":
            extra = (
                " (dynamic binarisation draws afresh every batch, so the trainer does it: "
                "load with binarize='none')"
            )
        raise ConfigError(f"`binarize` must be one of {list(_BINARIZE)}, got {binarize!r}{extra}")
    if flatten not in (None, True, False):
        raise ConfigError(f"`flatten` must be None, True or False, got {flatten!r}")
    for arg, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ConfigError(f"`{arg}` must be a number, got {value!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"`val_fraction` must be in [0, 1), got {val_fraction!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}")
    if max_train is not None and (
        isinstance(max_train, bool) or not isinstance(max_train, (int, np.integer)) or max_train < 1
    ):
        raise ConfigError(f"`max_train` must be a positive integer or None, got {max_train!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ConfigError(f"`seed` must be an integer in [0, 2**32), got {seed!r}")


def _dataset_name(data: Any) -> str | None:
    """The canonical data set name if ``data`` names one, else ``None``."""
    if not isinstance(data, str):
        return None
    key = data.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in DATASETS else None


# --------------------------------------------------------------------------------------------
# raw sources: everything is normalised to this before splitting
# --------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    name: str
    source: str
    x: np.ndarray  # (N, *shape): float32 already scaled
    y: np.ndarray | None  # int64 (N,)
    shape: tuple[int, ...]  # natural per-point shape (flat (D,) or (C, H, W))
    image_shape: tuple[int, int, int] | None
    num_levels: int | None
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None


def _load_named(name: str, root: str | os.PathLike | None, download: bool, extra: bool) -> _Raw:
    if name == "digits":
        return _load_digits()
    base = default_root() if root is None else Path(root).expanduser()
    base = base.absolute()
    if name in _MNIST_DIRS:
        return _load_mnist(name, base, download)
    return _load_svhn(base, download, extra)


def _load_digits() -> _Raw:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    return _Raw(
        name="digits",
        source="sklearn.datasets.load_digits",
        x=x,
        y=y,
        shape=(64,),
        image_shape=(1, 8, 8),
        num_levels=17,
        num_classes=10,
        class_names=_CLASS_NAMES["digits"],
    )


def _load_mnist(name: str, base: Path, download: bool) -> _Raw:
    import torchvision.datasets as tvd

    cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
    raw_dir = base / _MNIST_DIRS[name] / "raw"
    processed = base / _MNIST_DIRS[name] / "processed"
    legacy = all((processed / f).is_file() for f in ("training.pt", "test.pt"))
    if not legacy:
        _gunzip_missing(raw_dir, _MNIST_FILES)
    missing = [f for f in _MNIST_FILES if not (raw_dir / f).is_file()]
    if missing and not legacy and not download:
        raise ConfigError(
            f"data set '{name}' not found: {raw_dir} lacks {', '.join(missing)} (or their .gz "
            f"archives); {_DOWNLOAD_HINT} or put the files in {raw_dir} "
            f"(data root: root= or $PPL_VAE_DATA)"
        )
    try:
        train = cls(str(base), train=True, download=download)
        test = cls(str(base), train=False, download=download)
    except (RuntimeError, OSError) as exc:  # URLError is an OSError
        what = "download data set '{}' into" if download else "find data set '{}' in"
        raise ConfigError(
            f"could not {what.format(name)} {raw_dir}: {_one_line(exc)}"
            + (f"; {_DOWNLOAD_HINT} or put the files in {raw_dir}" if not download else "")
        ) from exc
    except (AssertionError, TypeError, ValueError, IndexError) as exc:
        raise ConfigError(
            f"could not read data set '{name}' from {raw_dir} (corrupted IDX file?): "
            f"{_one_line(exc) or type(exc).__name__}"
        ) from exc
    xs, ys = [], []
    for part, split in ((train, "train"), (test, "t10k")):
        data, targets = part.data, part.targets
        if data.ndim != 3 or data.dtype != torch.uint8 or targets.shape != data.shape[:1]:
            raise ConfigError(
                f"could not read data set '{name}' from {raw_dir}: {split} images have shape "
                f"{tuple(data.shape)} ({data.dtype}) and labels {tuple(targets.shape)}; expected "
                f"uint8 (N, H, W) images and N labels"
            )
        xs.append(data.numpy()[:, None].astype(np.float32) / 255.0)
        ys.append(targets.numpy().astype(np.int64))
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise ConfigError(
            f"data set '{name}' in {raw_dir}: training images are {xs[0].shape[2:]} but test "
            f"images are {xs[1].shape[2:]}"
        )
    shape = tuple(int(s) for s in xs[0].shape[1:])
    return _Raw(
        name=name,
        source=str(raw_dir),
        x=xs[0],
        y=ys[0],
        x_test=xs[1],
        y_test=ys[1],
        shape=shape,
        image_shape=shape,  # type: ignore[arg-type]
        num_levels=256,
        num_classes=10,
        class_names=_CLASS_NAMES[name],
    )


def _gunzip_missing(raw_dir: Path, names: tuple[str, ...]) -> None:
    """Decompress ``NAME.gz`` to ``NAME`` where only the archive is present (atomically)."""
    for fname in names:
        target, archive = raw_dir / fname, raw_dir / (fname + ".gz")
        if target.is_file() or not archive.is_file():
            continue
        fd, tmp = tempfile.mkstemp(dir=raw_dir, prefix=f".{fname}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(archive, "rb") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, target)
        except (OSError, EOFError) as exc:
            Path(tmp).unlink(missing_ok=True)
            raise ConfigError(
                f"could not decompress data file {archive}: {_one_line(exc)}"
            ) from exc


def _load_svhn(base: Path, download: bool, extra: bool) -> _Raw:
    svhn_dir = base / "SVHN"
    splits = ["train", "test", *(["extra"] if extra else [])]
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if download:
        import torchvision.datasets as tvd

        for split in splits:
            try:
                ds = tvd.SVHN(str(svhn_dir), split=split, download=True)
            except (RuntimeError, OSError) as exc:
                raise ConfigError(
                    f"could not download data set 'svhn' ({split}) into {svhn_dir}: "
                    f"{_one_line(exc)}"
                ) from exc
            arrays[split] = (np.asarray(ds.data), np.asarray(ds.labels, dtype=np.int64))
    else:
        missing = [_SVHN_FILES[s] for s in splits if not (svhn_dir / _SVHN_FILES[s]).is_file()]
        if missing:
            raise ConfigError(
                f"data set 'svhn' not found: {svhn_dir} lacks {', '.join(missing)}; "
                f"{_DOWNLOAD_HINT} or put the files in {svhn_dir} (data root: root= or "
                f"$PPL_VAE_DATA)"
            )
        for split in splits:
            arrays[split] = _read_svhn_mat(svhn_dir / _SVHN_FILES[split])
    train_x = np.concatenate([arrays[s][0] for s in splits if s != "test"])
    train_y = np.concatenate([arrays[s][1] for s in splits if s != "test"])
    test_x, test_y = arrays["test"]
    return _Raw(
        name="svhn",
        source=str(svhn_dir),
        x=train_x.astype(np.float32) / 255.0,
        y=train_y,
        x_test=test_x.astype(np.float32) / 255.0,
        y_test=test_y,
        shape=(3, 32, 32),
        image_shape=(3, 32, 32),
        num_levels=256,
        num_classes=10,
        class_names=_CLASS_NAMES["svhn"],
    )


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one SVHN ``.mat`` file as torchvision's ``SVHN`` does, without its md5 check."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises many types for a bad file
        raise ConfigError(f"could not read data file {path}: {_one_line(exc)}") from exc
    if "X" not in mat or "y" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise ConfigError(f"data file {path} has variables {keys}; expected 'X' and 'y' (SVHN)")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise ConfigError(
            f"data file {path}: 'X' has shape {x.shape} ({x.dtype}); expected uint8 (32, 32, 3, N)"
        )
    y = y.astype(np.int64).reshape(-1)
    if y.shape[0] != x.shape[3]:
        raise ConfigError(f"data file {path}: 'y' has {y.shape[0]} labels for {x.shape[3]} images")
    if y.size and (y.min() < 0 or y.max() > 10):
        raise ConfigError(f"data file {path}: labels must be in 0..10, got {y.min()}..{y.max()}")
    y[y == 10] = 0  # SVHN labels the digit 0 as 10
    return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1))), y


# --------------------------------------------------------------------------------------------
# files and arrays
# --------------------------------------------------------------------------------------------


def _load_custom(data: Any, test_data: Any, labels: Any) -> _Raw:
    x, y, source, name, levels = _read_source(data, role="data")
    if labels is not None:
        if y is not None:
            raise ConfigError(
                f"labels given twice: {source} carries its own labels and `labels` was passed too"
            )
        y = _check_labels(labels, len(x), f"`labels` for {source}")
    shape, image_shape, x = _infer_shape(x, source)
    _check_values(x, source)
    raw = _Raw(
        name=name, source=source, x=x, y=y, shape=shape, image_shape=image_shape, num_levels=levels
    )
    if test_data is not None:
        xt, yt, tsource, _, tlevels = _read_source(test_data, role="test data")
        tshape, _, xt = _infer_shape(xt, tsource)
        if tshape != shape:
            raise ConfigError(
                f"test data {tsource} has points of shape {tshape} but the training data "
                f"{source} has {shape}"
            )
        if tlevels != levels:
            raise ConfigError(
                f"test data {tsource} has {_levels_text(tlevels)} but the training data {source} "
                f"has {_levels_text(levels)}, so they would be scaled differently; store both "
                f"with the same dtype"
            )
        _check_values(xt, tsource)
        raw.x_test, raw.y_test = xt, yt
        raw.source = f"{source}; test: {tsource}"
    label_sets = [a for a in (raw.y, raw.y_test) if a is not None and a.size]
    if label_sets:
        raw.num_classes = int(max(int(a.max()) for a in label_sets)) + 1
    return raw


def _levels_text(levels: int | None) -> str:
    return {256: "uint8 values (scaled by 1/255)", 2: "boolean values"}.get(
        levels, "non-uint8 values (kept as they are)"
    )


def _read_source(
    data: Any, role: str
) -> tuple[np.ndarray, np.ndarray | None, str, str, int | None]:
    """Returns ``(x scaled to float32, labels or None, source text, name, num_levels)``."""
    if isinstance(data, torch.Tensor):
        t = data.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        array = t.numpy()
        source, name, y = f"in-memory torch tensor of shape {tuple(data.shape)}", "array", None
    elif isinstance(data, np.ndarray):
        array = data
        source, name, y = f"in-memory numpy array of shape {data.shape}", "array", None
    elif isinstance(data, (str, os.PathLike)):
        array, y, source, name = _read_file(data, role)
    else:
        raise ConfigError(
            f"{role} must be a data set name ({', '.join(DATASETS)}), a path to a .npy/.npz "
            f"file, a numpy array or a torch tensor; got {type(data).__name__}"
        )
    if y is not None:
        y = _check_labels(y, len(array) if array.ndim else 0, f"labels 'y' in {source}")
    x, levels = _to_float(array, source)
    return x, y, source, name, levels


def _read_file(
    data: str | os.PathLike, role: str
) -> tuple[np.ndarray, np.ndarray | None, str, str]:
    path = Path(data).expanduser()
    if not path.exists():
        text = os.fspath(data)
        near = difflib.get_close_matches(str(text).lower(), DATASETS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(
            f"unknown {role} {text!r}{hint}: expected a data set name, one of "
            f"{list(DATASETS)}, or the path of an existing .npy/.npz file (no such file: "
            f"{path.absolute()})"
        )
    if not path.is_file():
        raise ConfigError(f"{role} {path} is not a file; expected a .npy or .npz file")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise ConfigError(f"{role} file {path} has extension {suffix!r}; expected .npy or .npz")
    try:
        # Opened here so that the handle is closed even when the file fails to parse (given a
        # path, np.load leaves its own handle open when a zip header does not parse).
        if suffix == ".npy":
            with open(path, "rb") as handle:
                array = np.load(handle, allow_pickle=False)
                if not isinstance(array, np.ndarray):  # a zip archive under a .npy name
                    raise ConfigError(
                        f"data file {path} is an .npz archive, not an .npy array; rename it "
                        f"to {path.with_suffix('.npz').name}"
                    )
                return np.asarray(array), None, str(path), path.name
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as loaded:
            keys = list(loaded.files)
            xkey = next((k for k in ("x", "data", "X") if k in keys), None)
            if xkey is None:
                raise ConfigError(
                    f"data file {path} has arrays {keys}; expected the data under 'x' (or "
                    f"'data' / 'X') and optional labels under 'y' (or 'labels')"
                )
            ykey = next((k for k in ("y", "labels") if k in keys), None)
            x = np.asarray(loaded[xkey])
            y = None if ykey is None else np.asarray(loaded[ykey])
        return x, y, str(path), path.name
    except ConfigError:
        raise
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError, BadZipFile, ...
        raise ConfigError(f"could not read data file {path}: {_one_line(exc)}") from exc


def _to_float(array: np.ndarray, source: str) -> tuple[np.ndarray, int | None]:
    if array.ndim == 0 or array.shape[0] == 0 or array.size == 0:
        raise ConfigError(f"{source} is empty (shape {array.shape}); expected (N, ...) with N >= 1")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0), 256
    if array.dtype == np.bool_:
        return array.astype(np.float32), 2
    if array.dtype.kind not in "iuf":
        raise ConfigError(
            f"{source} has dtype {array.dtype}; expected a real-valued (float, int or uint8) array"
        )
    return array.astype(np.float32), None


def _infer_shape(
    x: np.ndarray, source: str
) -> tuple[tuple[int, ...], tuple[int, int, int] | None, np.ndarray]:
    """Returns ``(per-point shape, display shape or None, x reshaped)``."""
    expected = "expected (N, D), (N, H, W), (N, C, H, W) or (N, H, W, C) with C in {1, 3}"
    if x.ndim == 2:
        d = x.shape[1]
        s = math.isqrt(d)
        image = (1, s, s) if s * s == d and d >= 16 else None
        return (d,), image, x
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
            x = np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
    else:
        raise ConfigError(f"{source} has shape {x.shape}; {expected}")
    shape = tuple(int(s) for s in x.shape[1:])
    return shape, shape, x  # type: ignore[return-value]


def _check_values(x: np.ndarray, source: str) -> None:
    finite = np.isfinite(x)
    if not finite.all():
        bad = ~finite
        count = int(bad.sum())
        first = int(np.argmax(bad.reshape(len(x), -1).any(axis=1)))
        raise ConfigError(
            f"{source} has {count} non-finite value{'s' if count > 1 else ''} (NaN or inf); "
            f"the first is in data point {first}"
        )


def _check_labels(labels: Any, n: int, what: str) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ConfigError(f"{what} must have shape (N,), got {y.shape}")
    if y.shape[0] != n:
        raise ConfigError(f"{what} has {y.shape[0]} entries but the data has {n} points")
    if y.dtype == np.bool_ or y.dtype.kind not in "iuf":
        raise ConfigError(f"{what} must be integer class indices, got dtype {y.dtype}")
    if y.dtype.kind == "f":
        fractional = ~np.isfinite(y) | (np.mod(np.nan_to_num(y), 1.0) != 0)
        if fractional.any():
            i = int(np.argmax(fractional))
            raise ConfigError(
                f"{what} must be integer class indices, got {y[i].item()} at index {i}"
            )
    if (y < 0).any():
        i = int(np.argmax(y < 0))
        raise ConfigError(
            f"{what} must be non-negative class indices 0..K-1, got {y[i].item()} at index {i}"
        )
    return y.astype(np.int64)


# --------------------------------------------------------------------------------------------
# splitting, binarising, assembling
# --------------------------------------------------------------------------------------------


def _split(
    n: int, size: int, y: np.ndarray | None, seed: int, what: str, source: str
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Split ``range(n)`` into ``(rest, held_out of `size`)``, stratified when possible."""
    from sklearn.model_selection import train_test_split

    if size == 0:
        return np.arange(n), np.arange(0), False
    if size >= n:
        raise ConfigError(
            f"{source} has {n} points: too few to hold out {size} for the {what} set and keep "
            f"any for training"
        )
    index = np.arange(n)
    if y is not None:
        try:
            rest, held = train_test_split(index, test_size=size, random_state=seed, stratify=y)
            return np.asarray(rest), np.asarray(held), True
        except ValueError:
            pass  # a class too small to stratify: fall back to a plain random split
    rest, held = train_test_split(index, test_size=size, random_state=seed, shuffle=True)
    return np.asarray(rest), np.asarray(held), False


def _fraction_size(fraction: float, n: int, what: str, source: str) -> int:
    if fraction == 0:
        return 0
    size = round(fraction * n)
    if size < 1:
        raise ConfigError(
            f"{source} has {n} points: {what}_fraction={fraction} leaves no point for the {what} "
            f"set; use more data or a larger {what}_fraction"
        )
    return size


def _binarize(x: np.ndarray, seed: int, stream: int, source: str) -> np.ndarray:
    if x.size and (x.min() < 0 or x.max() > 1):
        raise ConfigError(
            f"binarize='static' needs values in [0, 1]; {source} has values in "
            f"[{x.min():g}, {x.max():g}]"
        )
    rng = np.random.default_rng([seed, stream])
    return (rng.random(x.shape, dtype=np.float32) < x).astype(np.float32)


def _finish(
    raw: _Raw,
    binarize: str,
    flatten: bool | None,
    val_fraction: float,
    test_fraction: float,
    max_train: int | None,
    seed: int,
) -> Dataset:
    seed = int(seed)
    x, y = raw.x, raw.y
    split_made: list[bool] = []  # for each split made: was it stratified?
    if raw.x_test is None:
        n_test = _fraction_size(test_fraction, len(x), "test", raw.source)
        rest, test_idx, strat = _split(len(x), n_test, y, seed, "test", raw.source)
        split_made.append(strat)
        x_test = x[test_idx]
        y_test = None if y is None else y[test_idx]
        x, y = x[rest], None if y is None else y[rest]
    else:
        x_test, y_test = raw.x_test, raw.y_test
    n_val = _fraction_size(val_fraction, len(x), "val", raw.source)
    train_idx, val_idx, strat = _split(len(x), n_val, y, seed, "validation", raw.source)
    if n_val:
        split_made.append(strat)
    stratified = bool(split_made) and all(split_made)
    if max_train is not None:
        train_idx = train_idx[: int(max_train)]
    parts = {
        "train": (x[train_idx], None if y is None else y[train_idx]),
        "val": (x[val_idx], None if y is None else y[val_idx]),
        "test": (x_test, y_test),
    }

    num_levels = raw.num_levels
    if binarize == "static":
        parts = {
            k: (_binarize(px, seed, i, raw.source), py)
            for i, (k, (px, py)) in enumerate(parts.items())
        }
        num_levels = 2

    shape = raw.shape
    if flatten is True:
        shape = (int(np.prod(shape)),)
    elif flatten is False:
        if raw.image_shape is None:
            raise ConfigError(
                f"flatten=False needs images, but {raw.source} has flat points of shape "
                f"{raw.shape} and no known image shape; pass (N, H, W) or (N, C, H, W) data"
            )
        shape = raw.image_shape

    def tensor_x(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(len(a), *shape))

    def tensor_y(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    return Dataset(
        name=raw.name,
        train_x=tensor_x(parts["train"][0]),
        val_x=tensor_x(parts["val"][0]),
        test_x=tensor_x(parts["test"][0]),
        train_y=tensor_y(parts["train"][1]),
        val_y=tensor_y(parts["val"][1]),
        test_y=tensor_y(parts["test"][1]),
        data_shape=tuple(int(s) for s in shape),
        image_shape=raw.image_shape,
        num_classes=raw.num_classes,
        num_levels=num_levels,
        binarized=binarize,
        source=raw.source,
        class_names=raw.class_names,
        seed=seed,
        stratified=bool(stratified),
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
