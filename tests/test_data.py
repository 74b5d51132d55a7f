r"""Tests of :mod:`ppl_vae.data`: digits, MNIST/Fashion-MNIST/SVHN from real-format fixtures,
files and arrays, and every kind of bad input. No test touches the network: an autouse fixture
makes any socket use fail.
"""

from __future__ import annotations

import gc
import json
import re
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_vae import ConfigError
from ppl_vae.data import Dataset, load_data
from tests.fixtures import IDX_FILES, write_idx_fixture, write_svhn_fixture


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _all_x(data: Dataset) -> torch.Tensor:
    return torch.cat([data.train_x, data.val_x, data.test_x])


def _splits(data: Dataset) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return [(data.train_x, data.train_y), (data.val_x, data.val_y), (data.test_x, data.test_y)]


def _as_uint8(x: torch.Tensor) -> np.ndarray:
    """Loaded 8-bit data back to its stored uint8 values (exact: k/255*255 rounds to k)."""
    return np.rint(x.numpy() * 255).astype(np.uint8)


def _lookup(images: np.ndarray, labels: np.ndarray) -> dict[bytes, int]:
    return {img.tobytes(): int(lab) for img, lab in zip(images, labels)}


# --------------------------------------------------------------------------------------------
# digits (scikit-learn's bundled data)
# --------------------------------------------------------------------------------------------


def test_digits_shapes_range_and_levels() -> None:
    data = load_data("digits", seed=0)
    # 1797 points: test round(0.2 * 1797) = 359, validation round(0.1 * 1438) = 144.
    assert data.train_x.shape == (1294, 64)
    assert data.val_x.shape == (144, 64)
    assert data.test_x.shape == (359, 64)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.data_shape == (64,) and data.image_shape == (1, 8, 8)
    assert data.num_classes == 10 and data.num_levels == 17 and data.binarized == "none"
    x = _all_x(data)
    assert x.min() == 0 and x.max() == 1
    scaled = x * 16
    assert torch.equal(scaled, scaled.round())  # values are k/16 exactly
    assert torch.unique(scaled).tolist() == [float(k) for k in range(17)]
    assert data.stratified
    json.dumps(data.describe())  # JSON-able
    assert data.describe()["sizes"] == {"train": 1294, "val": 144, "test": 359}


def test_digits_split_is_stratified() -> None:
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target, minlength=10) / 1797
    data = load_data("digits", seed=3)
    for y in (data.train_y, data.val_y, data.test_y):
        counts = np.bincount(y.numpy(), minlength=10)
        # A stratified split gives each class floor or ceil of its proportional share:
        # so every count is within 1 of n * p_k.
        assert np.abs(counts - len(y) * full).max() <= 1.0


def test_digits_split_fixed_by_seed() -> None:
    a, b, c = load_data("digits", seed=1), load_data("digits", seed=1), load_data("digits", seed=2)
    for name in ("train_x", "val_x", "test_x", "train_y", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.train_x, c.train_x)
    assert not torch.equal(a.test_x, c.test_x)


def test_digits_labels_match_images() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    labels_of: dict[bytes, set[int]] = {}
    for img, lab in zip(bunch.data.astype(np.float32), bunch.target):
        labels_of.setdefault(img.tobytes(), set()).add(int(lab))
    data = load_data("digits", seed=0)
    for x, y in (
        (data.train_x, data.train_y),
        (data.val_x, data.val_y),
        (data.test_x, data.test_y),
    ):
        for img, lab in zip((x * 16).numpy(), y.tolist()):
            assert lab in labels_of[img.tobytes()]
    # One point against sklearn directly: the first training image is a row of load_digits.
    first = (data.train_x[0] * 16).numpy()
    rows = np.flatnonzero((bunch.data == first).all(axis=1))
    assert len(rows) >= 1 and int(bunch.target[rows[0]]) == int(data.train_y[0])


def test_digits_flatten_max_train_and_no_validation() -> None:
    images = load_data("digits", flatten=False)
    assert images.train_x.shape == (1294, 1, 8, 8) and images.data_shape == (1, 8, 8)
    full = load_data("digits", seed=4)
    small = load_data("digits", seed=4, max_train=50)
    assert small.train_x.shape == (50, 64)
    assert torch.equal(small.train_x, full.train_x[:50])
    assert torch.equal(small.val_x, full.val_x) and torch.equal(small.test_x, full.test_x)
    none = load_data("digits", val_fraction=0.0)
    assert none.val_x.shape == (0, 64) and none.val_y.shape == (0,)
    assert none.train_x.shape == (1438, 64)


# --------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST from IDX files, through torchvision's loaders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("name, cls_name", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_from_idx_files(tmp_path: Path, name: str, cls_name: str, compressed: bool) -> None:
    written = write_idx_fixture(tmp_path, cls_name, n_train=40, n_test=12, compressed=compressed)
    data = load_data(name, root=tmp_path, val_fraction=0.25, seed=0)
    assert data.train_x.shape == (30, 1, 28, 28) and data.val_x.shape == (10, 1, 28, 28)
    assert data.data_shape == (1, 28, 28) and data.image_shape == (1, 28, 28)
    assert data.num_levels == 256 and data.num_classes == 10 and data.name == name
    # The test split is the t10k file, in order, scaled by 1/255.
    assert torch.equal(data.test_x, torch.from_numpy(written["test_x"]).float() / 255)
    assert data.test_y.tolist() == written["test_y"].tolist()
    # Train + validation hold every training image once, each with its own label.
    label_of = _lookup(written["train_x"], written["train_y"])
    seen = []
    for x, y in ((data.train_x, data.train_y), (data.val_x, data.val_y)):
        for img, lab in zip(_as_uint8(x), y.tolist()):
            assert label_of[img.tobytes()] == lab
            seen.append(img.tobytes())
    assert sorted(seen) == sorted(label_of)
    if compressed:  # the archives were decompressed where torchvision reads
        assert all((tmp_path / cls_name / "raw" / f).is_file() for f in IDX_FILES)
    flat = load_data(name, root=tmp_path, flatten=True)
    assert flat.train_x.shape[1:] == (784,) and flat.image_shape == (1, 28, 28)


def test_mnist_download_flag_with_files_present_fetches_nothing(tmp_path: Path) -> None:
    written = write_idx_fixture(tmp_path, "MNIST", n_train=20, n_test=5)
    # torchvision's download() returns early when the files exist; sockets are disabled here.
    data = load_data("mnist", root=tmp_path, download=True)
    assert data.test_y.tolist() == written["test_y"].tolist()


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_missing_mnist_names_directory_and_download(tmp_path: Path, name: str, folder: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_data(name, root=tmp_path)
    msg = str(info.value)
    assert f"'{name}' not found" in msg and str(tmp_path / folder / "raw") in msg
    assert "--download" in msg and "train-images-idx3-ubyte" in msg
    assert not (tmp_path / folder).exists()  # nothing created, nothing fetched


def test_missing_data_uses_env_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPL_VAE_DATA", str(tmp_path / "store"))
    with pytest.raises(ConfigError, match="--download") as info:
        load_data("svhn")
    assert str(tmp_path / "store" / "SVHN") in str(info.value)


def test_partial_mnist_lists_missing_file(tmp_path: Path) -> None:
    write_idx_fixture(tmp_path, "MNIST", n_train=20, n_test=5)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match=r"lacks t10k-labels-idx1-ubyte \(or their \.gz"):
        load_data("mnist", root=tmp_path)


def test_corrupted_idx_file(tmp_path: Path) -> None:
    write_idx_fixture(tmp_path, "MNIST", n_train=20, n_test=5)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(ConfigError, match=r"could not read data set 'mnist' from .*MNIST/raw"):
        load_data("mnist", root=tmp_path)


# --------------------------------------------------------------------------------------------
# SVHN from .mat files
# --------------------------------------------------------------------------------------------


def test_svhn_from_mat_files(tmp_path: Path) -> None:
    written = write_svhn_fixture(tmp_path, n_train=40, n_test=12, n_extra=20)
    assert (written["train_y_raw"] == 10).any()  # the file really stores digit 0 as 10
    data = load_data("svhn", root=tmp_path, val_fraction=0.25)
    assert data.train_x.shape == (30, 3, 32, 32) and data.test_x.shape == (12, 3, 32, 32)
    assert data.data_shape == (3, 32, 32) and data.image_shape == (3, 32, 32)
    assert data.num_levels == 256 and data.num_classes == 10
    assert np.array_equal(_as_uint8(data.test_x), written["test_x"])
    assert data.test_y.tolist() == written["test_y"].tolist()
    assert 0 in data.test_y.tolist() and max(data.test_y.tolist()) <= 9
    label_of = _lookup(written["train_x"], written["train_y"])
    for img, lab in zip(_as_uint8(data.train_x), data.train_y.tolist()):
        assert label_of[img.tobytes()] == lab
    extra = load_data("svhn", root=tmp_path, val_fraction=0.25, svhn_extra=True)
    assert len(extra.train_x) + len(extra.val_x) == 60
    label_of |= _lookup(written["extra_x"], written["extra_y"])
    for img, lab in zip(_as_uint8(extra.train_x), extra.train_y.tolist()):
        assert label_of[img.tobytes()] == lab


def test_svhn_layout_matches_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    write_svhn_fixture(tmp_path, n_train=20, n_test=10)
    # torchvision verifies the md5 of the real file; skip only that check to compare layouts.
    monkeypatch.setattr(tvd.SVHN, "_check_integrity", lambda self: True)
    reference = tvd.SVHN(str(tmp_path / "SVHN"), split="test")
    data = load_data("svhn", root=tmp_path)
    assert np.array_equal(_as_uint8(data.test_x), reference.data)
    assert data.test_y.tolist() == reference.labels.tolist()


def test_svhn_missing_and_corrupted(tmp_path: Path) -> None:
    write_svhn_fixture(tmp_path, n_train=20, n_test=10)
    with pytest.raises(ConfigError, match=r"lacks extra_32x32\.mat.*--download"):
        load_data("svhn", root=tmp_path, svhn_extra=True)
    (tmp_path / "SVHN" / "test_32x32.mat").write_bytes(b"\x00" * 300)
    with pytest.raises(ConfigError, match=r"could not read data file .*test_32x32\.mat"):
        load_data("svhn", root=tmp_path)


@pytest.mark.parametrize(
    "name, message",
    [
        ("svhn", r"could not download data set 'svhn' \(train\) into .*SVHN: .*network"),
        ("mnist", r"could not download data set 'mnist' into .*MNIST/raw: .*network"),
    ],
)
def test_download_failure_is_a_config_error(tmp_path: Path, name: str, message: str) -> None:
    # Sockets are disabled by `_no_network`: torchvision's download fails, and says so in one line.
    with pytest.raises(ConfigError, match=message):
        load_data(name, root=tmp_path, download=True)


# --------------------------------------------------------------------------------------------
# files and in-memory arrays
# --------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(r) for r in x.reshape(len(x), -1).tolist())


def test_npy_file_without_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(50, 5)).astype(np.float64)
    np.save(tmp_path / "points.npy", x)
    data = load_data(tmp_path / "points.npy", seed=0)
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (36, 4, 10)
    assert data.data_shape == (5,) and data.image_shape is None
    assert data.num_levels is None and data.num_classes is None and data.train_y is None
    assert data.name == "points.npy" and data.source == str(tmp_path / "points.npy")
    assert _rows(_all_x(data)) == _rows(torch.from_numpy(x.astype(np.float32)))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("archive", r"is an \.npz archive, not an \.npy array; rename it to a\.npz"),
        ("broken zip", r"could not read data file .*a\.npy"),
        ("broken npy", r"could not read data file .*a\.npy"),
    ],
)
def test_an_unreadable_npy_file_is_one_error_and_leaves_no_file_open(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "a.npy"
    if content == "archive":  # np.savez appends .npz to a name without it
        np.savez(tmp_path / "a", x=np.zeros((5, 4), dtype=np.float32))
        (tmp_path / "a.npz").rename(path)
    else:
        path.write_bytes((b"PK\x03\x04" if content == "broken zip" else b"\x93NUMPY") + b"\0" * 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConfigError, match=message):
            load_data(path)
        gc.collect()  # a handle left open is closed here, with a ResourceWarning
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


@pytest.mark.parametrize("keys", [("x", "y"), ("data", "labels"), ("X", "y")])
def test_npz_file_with_labels(tmp_path: Path, keys: tuple[str, str]) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 16)).astype(np.float32)
    y = np.arange(60) % 3
    np.savez(tmp_path / "set.npz", **{keys[0]: x, keys[1]: y})
    data = load_data(str(tmp_path / "set.npz"))
    assert data.num_classes == 3 and data.image_shape == (1, 4, 4)  # 16 = 4 * 4
    label_of = {r.tobytes(): int(lab) for r, lab in zip(x, y)}
    for xs, ys in (
        (data.train_x, data.train_y),
        (data.val_x, data.val_y),
        (data.test_x, data.test_y),
    ):
        for r, lab in zip(xs.numpy(), ys.tolist()):
            assert label_of[r.tobytes()] == lab


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_in_memory_arrays_with_and_without_labels(kind: str) -> None:
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(40, 6)).astype(np.float32)
    y = np.arange(40) % 4
    as_kind = torch.from_numpy if kind == "torch" else np.asarray
    data = load_data(as_kind(x), labels=as_kind(y), val_fraction=0.2, test_fraction=0.25)
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (24, 6, 10)
    assert data.num_classes == 4 and data.name == "array" and data.stratified
    # 3 validation points cannot hold 4 classes: a plain random split, and it says so.
    fallback = load_data(as_kind(x), labels=as_kind(y), val_fraction=0.1, test_fraction=0.25)
    assert len(fallback.val_x) == 3 and not fallback.stratified
    label_of = {r.tobytes(): int(lab) for r, lab in zip(x, y)}
    for r, lab in zip(data.train_x.numpy(), data.train_y.tolist()):
        assert label_of[r.tobytes()] == lab
    unlabelled = load_data(as_kind(x))
    assert unlabelled.train_y is None and unlabelled.num_classes is None
    assert _rows(_all_x(unlabelled)) == _rows(torch.from_numpy(x))


def test_uint8_scaling_and_channels_last() -> None:
    rng = np.random.default_rng(3)
    nhwc = rng.integers(0, 256, size=(30, 8, 8, 3), dtype=np.uint8)
    data = load_data(nhwc, test_fraction=0.2, val_fraction=0.1)
    assert data.data_shape == (3, 8, 8) and data.image_shape == (3, 8, 8)
    assert data.num_levels == 256 and float(_all_x(data).max()) <= 1.0
    nchw = np.transpose(nhwc, (0, 3, 1, 2))
    assert sorted(i.tobytes() for i in _as_uint8(_all_x(data))) == sorted(i.tobytes() for i in nchw)
    gray = load_data(rng.integers(0, 256, size=(30, 5, 7), dtype=np.uint8))
    assert gray.data_shape == (1, 5, 7)
    channels_first = load_data(torch.zeros(30, 1, 6, 6, dtype=torch.uint8))
    assert channels_first.data_shape == (1, 6, 6)
    booleans = load_data(np.eye(20, 4, dtype=bool))
    assert booleans.num_levels == 2


def test_separate_test_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    train, test = rng.normal(size=(50, 4)), rng.normal(size=(7, 4))
    np.savez(tmp_path / "test.npz", x=test, y=np.arange(7) % 2)
    data = load_data(train, test_data=tmp_path / "test.npz", labels=np.arange(50) % 2)
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (45, 5, 7)
    assert torch.equal(data.test_x, torch.from_numpy(test.astype(np.float32)))
    assert data.test_y.tolist() == (np.arange(7) % 2).tolist()


# --------------------------------------------------------------------------------------------
# static binarisation
# --------------------------------------------------------------------------------------------


def test_static_binarisation() -> None:
    grey = load_data("digits", seed=5)
    a = load_data("digits", seed=5, binarize="static")
    b = load_data("digits", seed=5, binarize="static")
    c = load_data("digits", seed=6, binarize="static")
    assert a.binarized == "static" and a.num_levels == 2
    assert set(torch.unique(_all_x(a)).tolist()) == {0.0, 1.0}
    assert torch.equal(_all_x(a), _all_x(b)) and not torch.equal(a.train_x, c.train_x)
    # Same split as without binarisation: zeros stay 0 and ones stay 1, exactly.
    p = grey.train_x
    assert torch.all(a.train_x[p == 0] == 0) and torch.all(a.train_x[p == 1] == 1)
    # E[b] = p: the mean over 1294 * 64 independent draws is within 5 standard errors of
    # mean(p) (false-failure rate about 6e-7; the draws are fixed by the seed anyway).
    se = torch.sqrt((p * (1 - p)).sum()) / p.numel()
    assert abs(float(a.train_x.mean() - p.mean())) < 5 * float(se)
    # The test set's draws do not depend on max_train.
    small = load_data("digits", seed=5, binarize="static", max_train=10)
    assert torch.equal(small.test_x, a.test_x)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def _bad_npy(tmp_path: Path) -> Path:
    np.save(tmp_path / "good.npy", np.zeros((10, 3)))
    data = (tmp_path / "good.npy").read_bytes()
    (tmp_path / "bad.npy").write_bytes(data[:20])
    return tmp_path / "bad.npy"


def _with_nan() -> np.ndarray:
    x = np.zeros((10, 4))
    x[3, 1] = np.nan
    x[7, 0] = np.inf
    return x


BAD_INPUTS = {
    "nan": (lambda p: {"data": _with_nan()}, [r"2 non-finite values", r"data point 3"]),
    "inf-torch": (
        lambda p: {"data": torch.tensor([[0.0], [float("-inf")], [1.0]] * 4)},
        [r"torch tensor of shape \(12, 1\) has 4 non-finite values", r"data point 1"],
    ),
    "empty": (lambda p: {"data": np.zeros((0, 4))}, [r"is empty \(shape \(0, 4\)\)"]),
    "labels-length": (
        lambda p: {"data": np.zeros((10, 2)), "labels": np.zeros(9, dtype=int)},
        [r"has 9 entries but the data has 10 points"],
    ),
    "labels-fractional": (
        lambda p: {"data": np.zeros((4, 2)), "labels": np.array([0, 1, 0.5, 1])},
        [r"must be integer class indices, got 0.5 at index 2"],
    ),
    "labels-negative": (
        lambda p: {"data": np.zeros((4, 2)), "labels": torch.tensor([0, 1, -1, 1])},
        [r"non-negative class indices 0..K-1, got -1 at index 2"],
    ),
    "labels-strings": (
        lambda p: {"data": np.zeros((2, 2)), "labels": np.array(["a", "b"])},
        [r"must be integer class indices, got dtype <U1"],
    ),
    "unknown-name": (
        lambda p: {"data": "mnsit"},
        [r"unknown data 'mnsit' \(did you mean 'mnist'\?\)", r"'digits'", r"existing \.npy/\.npz"],
    ),
    "corrupted-npy": (
        lambda p: {"data": _bad_npy(p)},
        [r"could not read data file .*bad\.npy: "],
    ),
    "npz-without-x": (
        lambda p: (np.savez(p / "w.npz", images=np.zeros((3, 2))), {"data": p / "w.npz"})[1],
        [r"has arrays \['images'\]; expected the data under 'x'"],
    ),
    "extension": (
        lambda p: ((p / "d.csv").write_text("1,2\n"), {"data": p / "d.csv"})[1],
        [r"extension '\.csv'; expected \.npy or \.npz"],
    ),
    "test-shape": (
        lambda p: {"data": np.zeros((10, 4)), "test_data": np.zeros((5, 3))},
        [r"test data .* has points of shape \(3,\) but the training data .* has \(4,\)"],
    ),
    "test-dtype": (
        lambda p: {
            "data": np.zeros((10, 4), dtype=np.uint8),
            "test_data": np.zeros((5, 4), dtype=np.float32),
        },
        [r"scaled differently"],
    ),
    "test-missing-file": (
        lambda p: {"data": np.zeros((10, 4)), "test_data": p / "nope.npy"},
        [r"unknown test data .*nope\.npy"],
    ),
    "one-dimensional": (
        lambda p: {"data": np.zeros(10)},
        [r"numpy array of shape \(10,\) has shape \(10,\); expected \(N, D\)"],
    ),
    "five-dimensional": (lambda p: {"data": np.zeros((2, 1, 1, 1, 1))}, [r"expected \(N, D\)"]),
    "complex": (lambda p: {"data": np.zeros((3, 2), dtype=complex)}, [r"dtype complex128"]),
    "a-list": (lambda p: {"data": [[0.0, 1.0]]}, [r"got list"]),
    "dynamic": (
        lambda p: {"data": "digits", "binarize": "dynamic"},
        [r"`binarize` must be one of \['none', 'static'\], got 'dynamic'", r"trainer"],
    ),
    "binarize-range": (
        lambda p: {"data": np.full((10, 2), 2.0), "binarize": "static"},
        [r"needs values in \[0, 1\]; .* values in \[2, 2\]"],
    ),
    "test-data-with-name": (
        lambda p: {"data": "digits", "test_data": np.zeros((3, 64))},
        [r"`test_data` is for files and arrays; data set 'digits'"],
    ),
    "labels-with-name": (
        lambda p: {"data": "digits", "labels": np.zeros(3)},
        [r"`labels` is for files and arrays"],
    ),
    "labels-twice": (
        lambda p: (
            np.savez(p / "l.npz", x=np.zeros((4, 2)), y=np.zeros(4, dtype=int)),
            {"data": p / "l.npz", "labels": np.zeros(4, dtype=int)},
        )[1],
        [r"labels given twice"],
    ),
    "extra-not-svhn": (lambda p: {"data": "digits", "svhn_extra": True}, [r"'svhn' only"]),
    "flatten-false-flat": (
        lambda p: {"data": np.zeros((10, 5)), "flatten": False},
        [r"flatten=False needs images"],
    ),
    "val-fraction": (lambda p: {"val_fraction": 1.5}, [r"`val_fraction` must be in \[0, 1\)"]),
    "test-fraction": (lambda p: {"test_fraction": 0.0}, [r"`test_fraction` must be in \(0, 1\)"]),
    "max-train": (lambda p: {"max_train": 0}, [r"`max_train` must be a positive integer"]),
    "seed": (lambda p: {"seed": -1}, [r"`seed` must be an integer in \[0, 2\*\*32\), got -1"]),
    "too-few": (
        lambda p: {"data": np.zeros((2, 3)), "test_fraction": 0.1},
        [r"has 2 points: test_fraction=0.1 leaves no point for the test set"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_config_error(tmp_path: Path, case: str) -> None:
    make_kwargs, patterns = BAD_INPUTS[case]
    kwargs = make_kwargs(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_data(**kwargs)
    msg = str(info.value)
    assert "\n" not in msg  # one line
    for pattern in patterns:
        assert re.search(pattern, msg), (pattern, msg)


# --------------------------------------------------------------------------------------------
# the Dataset object
# --------------------------------------------------------------------------------------------


def test_dataset_to_device(device: torch.device) -> None:
    data = load_data("digits", max_train=20)
    moved = data.to(device)
    for name in ("train_x", "val_x", "test_x", "train_y", "val_y", "test_y"):
        assert getattr(moved, name).device.type == device.type
        assert torch.equal(getattr(moved, name).cpu(), getattr(data, name))
    assert data.train_x.device.type == "cpu"  # the original is unchanged
    unlabelled = load_data(np.zeros((10, 2)), test_fraction=0.3).to(device)
    assert unlabelled.train_y is None and unlabelled.train_x.device.type == device.type
    assert moved.describe() == data.describe()
