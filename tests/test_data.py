"""Data loaders and splits: formats, checksums, partitions, Dirichlet shares, errors."""

from __future__ import annotations

import gzip
import hashlib
import os

import numpy as np
import pytest
import torch

from pyfusion import data

MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
}


def _write_idx(path: str, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_idx_dir(tmp_path, rng):
    imgs = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    labs = rng.integers(0, 10, size=7, dtype=np.uint8)
    _write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), imgs)
    _write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), labs)
    return tmp_path, imgs, labs


def test_idx_roundtrip_values_and_dtypes(tiny_idx_dir):
    path, imgs, labs = tiny_idx_dir
    x, y = data.load_idx_dataset(str(path), "train")
    assert x.shape == (7, 1, 5, 4) and x.dtype == torch.float32
    assert y.shape == (7,) and y.dtype == torch.int64
    np.testing.assert_array_equal(x[:, 0].numpy(), imgs.astype(np.float32) / 255)
    np.testing.assert_array_equal(y.numpy(), labs)
    assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_missing_file_is_named(tiny_idx_dir, tmp_path):
    path, _, _ = tiny_idx_dir
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        data.load_idx_dataset(str(path), "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_mnist(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="split must be"):
        data.load_idx_dataset(str(path), "val")


def test_bad_idx_header(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(p, "wb") as fh:
        fh.write(b"\x01\x02\x03\x04garbage")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(str(p))
    _write_idx(str(p), np.zeros((2, 3, 3), np.uint8))
    with gzip.open(p, "rb") as fh:
        raw = fh.read()
    with gzip.open(p, "wb") as fh:
        fh.write(raw[:-1])
    with pytest.raises(ValueError, match="data bytes"):
        data.read_idx(str(p))


@pytest.mark.data
def test_mnist_checksums_and_shapes(shared_data_dir):
    mnist = os.path.join(shared_data_dir, "mnist")
    for name, md5 in MNIST_MD5.items():
        with gzip.open(os.path.join(mnist, name), "rb") as fh:
            assert hashlib.md5(fh.read()).hexdigest() == md5, name
    x, y = data.load_mnist(mnist, "test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert sorted(torch.unique(y).tolist()) == list(range(10))
    assert float(x.max()) == 1.0 and float(x.min()) == 0.0
    # The first test digit of MNIST is a 7 (a well-known fact, independent of this loader).
    assert int(y[0]) == 7


@pytest.mark.data
def test_fashion_mnist_loads(shared_data_dir):
    fm = os.path.join(shared_data_dir, "fashion-mnist")
    if not os.path.isdir(fm):
        pytest.skip(f"Fashion-MNIST not found under {fm}")
    x, y = data.load_fashion_mnist(fm, "test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert np.bincount(y.numpy()).tolist() == [1000] * 10


def test_digits_split_is_disjoint_cover():
    xtr, ytr = data.load_digits("train")
    xte, yte = data.load_digits("test")
    assert xtr.shape[1:] == (1, 8, 8) and xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert xtr.shape[0] + xte.shape[0] == 1797
    assert abs(xte.shape[0] / 1797 - 0.25) < 0.01
    assert float(xtr.max()) <= 1.0 and float(xtr.min()) >= 0.0
    # train + test is exactly the data set (multiset of images, compared via per-image sums and labels).
    from sklearn.datasets import load_digits

    raw = load_digits()
    both = np.concatenate([xtr.reshape(-1, 64).numpy(), xte.reshape(-1, 64).numpy()])
    np.testing.assert_allclose(np.sort(both.sum(1)), np.sort(raw.images.reshape(1797, -1).sum(1) / 16), rtol=1e-6)
    np.testing.assert_array_equal(np.bincount(np.concatenate([ytr, yte])), np.bincount(raw.target))
    # stratified: every class is in the test split in about the right proportion
    assert np.all(np.abs(np.bincount(yte.numpy()) / np.bincount(raw.target) - 0.25) < 0.02)
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits("train", test_fraction=1.5)


def _assert_partition(splits, n):
    allidx = np.concatenate(splits)
    assert allidx.size == n
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("k", [2, 3, 5])
def test_dirichlet_split_partitions(k, rng):
    y = rng.integers(0, 10, size=3000)
    splits = data.dirichlet_split(y, k, seed=3)
    assert len(splits) == k
    _assert_partition(splits, y.size)
    shares = data.class_shares(y, splits, 10)
    assert shares.shape == (k, 10)
    np.testing.assert_allclose(shares.sum(0), 1.0)
    # deterministic under the seed, different under another seed
    again = data.dirichlet_split(torch.as_tensor(y), k, seed=3)
    for a, b in zip(splits, again):
        np.testing.assert_array_equal(a, b)
    other = data.dirichlet_split(y, k, seed=4)
    assert any(a.size != b.size or np.any(a != b) for a, b in zip(splits, other))


def test_dirichlet_shares_follow_concentrations_on_average():
    y = np.repeat(np.arange(10), 200)
    k = 4
    mean_shares = np.zeros((k, 10))
    mean_expected = np.zeros((k, 10))
    trials = 60
    for s in range(trials):
        conc = data.dirichlet_concentrations(10, k, seed=s)
        assert conc.shape == (10, k)
        np.testing.assert_allclose(np.sort(conc, axis=1), np.tile(np.linspace(1, 5, k), (10, 1)))
        mean_shares += data.class_shares(y, data.dirichlet_split(y, k, seed=s), 10)
        mean_expected += (conc / conc.sum(1, keepdims=True)).T
    mean_shares /= trials
    mean_expected /= trials
    # E[share] = a_k / sum(a); 60 draws per class of a Dirichlet: error well under 0.05.
    assert np.abs(mean_shares - mean_expected).max() < 0.06
    # With fixed (unshuffled) concentrations the ordering holds on average for every class.
    fixed = np.zeros((k, 10))
    for s in range(trials):
        fixed += data.class_shares(y, data.dirichlet_split(y, k, concentrations=np.linspace(1, 5, k), seed=s), 10)
    fixed /= trials
    assert np.all(np.diff(fixed.mean(1)) > 0)
    np.testing.assert_allclose(fixed.mean(1), np.linspace(1, 5, k) / np.linspace(1, 5, k).sum(), atol=0.03)


def test_dirichlet_errors():
    y = np.array([0, 1, 2, 1])
    with pytest.raises(ValueError, match="concentrations must have shape"):
        data.dirichlet_split(y, 2, concentrations=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="> 0"):
        data.dirichlet_split(y, 2, concentrations=[1.0, -2.0])
    with pytest.raises(ValueError, match="num_members"):
        data.dirichlet_split(y, 0)
    with pytest.raises(ValueError, match="labels must be 1-D"):
        data.dirichlet_split(np.zeros((2, 2), int), 2)


def test_shard_split_disjoint_classes(rng):
    y = rng.integers(0, 10, size=1000)
    splits = data.shard_split(y, 3, seed=1)
    _assert_partition(splits, y.size)
    classes = [set(np.unique(y[s]).tolist()) for s in splits]
    assert sorted(len(c) for c in classes) == [3, 3, 4]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not classes[i] & classes[j]
    shares = data.class_shares(y, splits)
    assert set(np.unique(shares).tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="num_members"):
        data.shard_split(y, 11)


def test_make_loader_and_subset():
    x = torch.arange(20, dtype=torch.float32).reshape(10, 2)
    y = torch.arange(10)
    xs, ys = data.subset(x, y, np.array([3, 1]))
    assert ys.tolist() == [3, 1] and xs[0].tolist() == [6.0, 7.0]
    with pytest.raises(ValueError, match="indices must be in"):
        data.subset(x, y, [10])
    a = [b[1].tolist() for b in data.make_loader(x, y, 4, shuffle=True, seed=5)]
    b = [b[1].tolist() for b in data.make_loader(x, y, 4, shuffle=True, seed=5)]
    c = [b[1].tolist() for b in data.make_loader(x, y, 4, shuffle=False)]
    assert a == b and c == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert sorted(sum(a, [])) == list(range(10)) and a != c
    with pytest.raises(ValueError, match="same number of samples"):
        data.make_loader(x, y[:3], 4)
