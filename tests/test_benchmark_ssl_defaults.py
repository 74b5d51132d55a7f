"""benchmarks/ssl_defaults.py's second data set: Fashion-MNIST read from its IDX files and
2x2-average-pooled to 14x14, checked against a hand computation on tiny files in the real
format (big-endian headers: magic 2051, n, rows, cols for images; 2049, n for labels)."""

from __future__ import annotations

import gzip
import importlib.util
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from ppl_vae import ConfigError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ssl_defaults.py"


@pytest.fixture(scope="module")
def ssl_defaults():
    sys.path.insert(0, str(SCRIPT.parent))  # it imports its sibling ssl_digits
    spec = importlib.util.spec_from_file_location("benchmark_ssl_defaults", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]
        sys.path.remove(str(SCRIPT.parent))


def _write_idx(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    n = len(images)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())


def test_pooled_subset_matches_hand_computation(ssl_defaults, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 28, 28))
    images[0, :2, :2] = [[0, 1], [0, 1]]  # mean 0.5: rounds half up, to 1
    images[0, :2, 2:4] = [[1, 2], [2, 2]]  # mean 1.75 -> 2
    labels = np.array([3, 1, 4, 1, 5, 9])
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_idx(raw, images, labels)
    out = ssl_defaults.fashion_npz(str(raw), tmp_path / "cache")
    with np.load(out) as f:
        x, y = f["x"], f["y"]
    # fewer images than the subset size: all kept, in file order
    assert x.shape == (6, 1, 14, 14) and x.dtype == np.uint8
    np.testing.assert_array_equal(y, labels)
    for i in range(6):
        for r in range(14):
            for c in range(14):
                block = images[i, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2]
                assert x[i, 0, r, c] == int(np.floor(block.sum() / 4 + 0.5))
    assert x[0, 0, 0, 0] == 1 and x[0, 0, 0, 1] == 2
    assert ssl_defaults._dims(str(out)) == 196
    # written once: a second call reads the cache even when the IDX files are gone
    for p in raw.iterdir():
        p.unlink()
    assert ssl_defaults.fashion_npz(str(raw), tmp_path / "cache") == out


def test_missing_files_name_what_was_expected(ssl_defaults, tmp_path, monkeypatch):
    monkeypatch.setattr(ssl_defaults, "FASHION_DIRS", ())
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte\.gz"):
        ssl_defaults.fashion_npz(str(tmp_path), tmp_path / "cache")


def test_every_tunable_default_grid_parses_to_values_fit_ssl_takes(ssl_defaults):
    parse = ssl_defaults.parse_grid
    assert parse("hidden_dims", "128,256-128, 512-256") == [(128,), (256, 128), (512, 256)]
    assert parse("latent_dim", "8,16") == [8, 16] and parse("batch_size", "64") == [64]
    assert parse("lr", "0.0003,0.001") == [0.0003, 0.001] and parse("alpha", "1") == [1.0]
    assert parse("network", "auto,mlp") == ["auto", "mlp"]
    for what, grid in ssl_defaults.TUNABLE.items():
        assert len(parse(what, grid)) == (2 if what == "network" else 3)
    assert ssl_defaults._label("hidden_dims", (256, 128)) == "256-128"
    assert (
        ssl_defaults._label("alpha", 0.3) == "0.3*D" and ssl_defaults._label("lr", 1e-3) == "0.001"
    )
    assert ssl_defaults._label("network", "mlp") == "mlp"


def test_fashion28_is_an_unpooled_prefix_of_the_same_draw(ssl_defaults, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 28, 28))
    labels = np.array([0, 1, 2, 3, 4, 5])
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_idx(raw, images, labels)
    monkeypatch.setattr(ssl_defaults, "SUBSET", 5)
    monkeypatch.setattr(ssl_defaults, "SUBSET28", 3)
    order = np.random.default_rng(ssl_defaults.SUBSET_SEED).permutation(6)
    out = ssl_defaults.fashion_npz(str(raw), tmp_path / "cache", size=28)
    assert out.name == "fashion28.npz"
    with np.load(out) as f:
        x, y = f["x"], f["y"]
    keep = np.sort(order[:3])  # the first 3 of the draw, in file order, not pooled
    assert x.shape == (3, 1, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[:, 0], images[keep])
    np.testing.assert_array_equal(y, labels[keep])
    with np.load(ssl_defaults.fashion_npz(str(raw), tmp_path / "cache")) as f:
        assert set(keep) <= set(f["y"].tolist())  # inside the 14x14 subset of 5
        assert len(f["y"]) == 5
