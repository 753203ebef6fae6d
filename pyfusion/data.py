"""Small offline data sets and the data regimes of the fusion papers (IID, Dirichlet non-IID, shards).

Loaders never download: they read files from a directory the caller names (MNIST / Fashion-MNIST in
the original gzip-compressed IDX format) or data shipped with a pip package (scikit-learn's digits).
Splits return index arrays into the label vector, so the same split can index images, labels and
any per-sample statistic.

Data regimes (neuron-interpolation fusion, Luenam et al. 2025, ``utils/dataset_utils.py``):

* non-IID: per class, the members' shares are drawn from a Dirichlet distribution whose
  concentrations are ``linspace(1, 5, K)`` shuffled independently per class, so every member is
  rich in some classes and poor in others;
* sharded: disjoint class subsets per member.

Text (character-level language models, offline): :func:`local_text_corpus` reads documents that every
Debian / Ubuntu system carries (the license texts under ``/usr/share/common-licenses``; fallback: the
Python standard library's sources), :func:`char_vocab` / :func:`encode_chars` map characters to ids and
:func:`token_windows` cuts an id sequence into ``(input, next-token target)`` windows.
"""

from __future__ import annotations

import gzip
import os
import sysconfig
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "class_balanced_indices",
    "char_vocab",
    "class_shares",
    "dirichlet_concentrations",
    "dirichlet_split",
    "encode_chars",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_dataset",
    "load_mnist",
    "local_text_corpus",
    "make_loader",
    "read_idx",
    "shard_split",
    "subset",
    "token_windows",
]

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type codes (third header byte) -> numpy big-endian dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array.

    The format (LeCun's MNIST release): two zero bytes, a type code, the number of dimensions n, then
    n big-endian uint32 sizes, then the data in row-major order.

    Args:
        path: file path; a ``.gz`` suffix means gzip.

    Returns:
        The array with the shape of the header, in native byte order.

    Raises:
        ValueError: the header is malformed or the payload size does not match it.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (header bytes {list(raw[:4])})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(
            f"{path}: header says {expected} data bytes for shape {tuple(dims)}, found {len(raw) - offset}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(tuple(dims)).astype(dtype.newbyteorder("="))


def _find_idx(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"missing IDX file {stem}.gz (or {stem}) in {os.path.abspath(directory)}; "
        "pyfusion never downloads data: put the MNIST-format files there or pass another directory"
    )


def load_idx_dataset(directory: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Load an MNIST-format data set (MNIST, Fashion-MNIST) from gzip IDX files in ``directory``.

    Args:
        directory: folder holding ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
            ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz`` (uncompressed also accepted).
        split: "train" or "test".

    Returns:
        ``(images, labels)``: images float32 (N, 1, H, W) with values in [0, 1] (pixel / 255),
        labels int64 (N,).

    Raises:
        ValueError: unknown split, or image and label counts differ.
        FileNotFoundError: a file is missing (the message names it).
    """
    if split not in _IDX_FILES:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"data directory {os.path.abspath(directory)} does not exist")
    img_stem, lab_stem = _IDX_FILES[split]
    images = read_idx(_find_idx(directory, img_stem))
    labels = read_idx(_find_idx(directory, lab_stem))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{directory}: expected images (N, H, W) and labels (N,); got {images.shape} and {labels.shape}"
        )
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255.0)).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_mnist(directory: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from ``directory`` (e.g. ``../shared/data/mnist``); see :func:`load_idx_dataset`."""
    return load_idx_dataset(directory, split)


def load_fashion_mnist(directory: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST from ``directory`` (e.g. ``../shared/data/fashion-mnist``); see :func:`load_idx_dataset`."""
    return load_idx_dataset(directory, split)


def load_digits(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's offline 8x8 digits (1797 images, 10 classes), split into train / test.

    The split is stratified by class and fixed by ``seed``, so "train" and "test" with the same
    arguments are disjoint and cover the data set.

    Args:
        split: "train" or "test".
        test_fraction: fraction of each class put in the test split, in (0, 1).
        seed: seed of the split.

    Returns:
        images float32 (N, 1, 8, 8) in [0, 1] (pixel / 16), labels int64 (N,).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    from sklearn.datasets import load_digits as _sk_digits

    data = _sk_digits()
    images = data.images.astype(np.float32) / np.float32(16.0)
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_mask[idx[: int(round(test_fraction * idx.size))]] = True
    keep = test_mask if split == "test" else ~test_mask
    return torch.from_numpy(images[keep]).unsqueeze(1), torch.from_numpy(labels[keep])


def _labels_np(labels: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,); got shape {arr.shape}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0):
        raise ValueError("labels must be non-negative integers")
    return arr.astype(np.int64)


def dirichlet_concentrations(num_classes: int, num_members: int, seed: int = 0) -> np.ndarray:
    """The default non-IID concentrations: ``linspace(1, 5, K)`` permuted independently per class.

    Returns:
        (C, K) float64: row c is the Dirichlet concentration vector of class c over the members.
    """
    if num_members < 1:
        raise ValueError(f"num_members must be >= 1; got {num_members}")
    rng = np.random.default_rng([seed, 0xD1])
    base = np.linspace(1.0, 5.0, num_members)
    return np.stack([rng.permutation(base) for _ in range(num_classes)]) if num_classes else np.zeros((0, num_members))


def dirichlet_split(
    labels: torch.Tensor | np.ndarray,
    num_members: int,
    concentrations: np.ndarray | Sequence[float] | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Non-IID split: each class's samples are divided among members with Dirichlet proportions.

    For class c with concentration vector a_c (K,), draw p_c ~ Dirichlet(a_c) and give member k the
    next ``round(p_c[k] * n_c)`` of the class's shuffled samples (largest-remainder rounding, so the
    counts sum to n_c). Every sample goes to exactly one member.

    Args:
        labels: (N,) integer class labels.
        num_members: K >= 1.
        concentrations: (K,) used for every class, or (C, K) per class; default
            :func:`dirichlet_concentrations` (``linspace(1, 5, K)`` shuffled per class, as in the
            neuron-interpolation paper).
        seed: seed of the draw.

    Returns:
        K sorted int64 index arrays that partition ``range(N)``.
    """
    y = _labels_np(labels)
    if num_members < 1:
        raise ValueError(f"num_members must be >= 1; got {num_members}")
    num_classes = int(y.max()) + 1 if y.size else 0
    if concentrations is None:
        conc = dirichlet_concentrations(num_classes, num_members, seed)
    else:
        conc = np.asarray(concentrations, dtype=np.float64)
        if conc.shape == (num_members,):
            conc = np.broadcast_to(conc, (num_classes, num_members))
        elif conc.ndim != 2 or conc.shape[1] != num_members or conc.shape[0] < num_classes:
            raise ValueError(
                f"concentrations must have shape ({num_members},) or ({num_classes}, {num_members}); got {conc.shape}"
            )
        if not np.all(np.isfinite(conc)) or np.any(conc <= 0):
            raise ValueError("concentrations must be finite and > 0")
    rng = np.random.default_rng([seed, 0xD2])
    parts: list[list[np.ndarray]] = [[] for _ in range(num_members)]
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(conc[c])
        raw = p * idx.size
        counts = np.floor(raw).astype(np.int64)
        short = idx.size - int(counts.sum())
        counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for k in range(num_members):
            parts[k].append(idx[bounds[k] : bounds[k + 1]])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def shard_split(labels: torch.Tensor | np.ndarray, num_members: int, seed: int = 0) -> list[np.ndarray]:
    """Sharded split: the classes are dealt into K disjoint subsets; member k gets all samples of its classes.

    The classes are shuffled by ``seed`` and dealt as evenly as possible (class counts differ by at
    most one between members).

    Returns:
        K sorted int64 index arrays that partition ``range(N)``.

    Raises:
        ValueError: fewer classes present than members.
    """
    y = _labels_np(labels)
    classes = np.unique(y)
    if num_members < 1 or classes.size < num_members:
        raise ValueError(f"num_members must be in [1, {classes.size}] (the number of classes); got {num_members}")
    order = np.random.default_rng([seed, 0x5D]).permutation(classes)
    groups = np.array_split(order, num_members)
    return [np.flatnonzero(np.isin(y, g)).astype(np.int64) for g in groups]


def class_shares(
    labels: torch.Tensor | np.ndarray, splits: Sequence[np.ndarray], num_classes: int | None = None
) -> np.ndarray:
    """Each member's share of each class.

    Returns:
        (K, C) float64: ``shares[k, c]`` = (samples of class c in split k) / (samples of class c);
        0 for a class with no samples. Columns sum to 1 when the splits partition the data.
    """
    y = _labels_np(labels)
    c = int(num_classes) if num_classes is not None else (int(y.max()) + 1 if y.size else 0)
    total = np.bincount(y, minlength=c).astype(np.float64)[:c]
    out = np.zeros((len(splits), c))
    for k, idx in enumerate(splits):
        out[k] = np.bincount(y[np.asarray(idx, dtype=np.int64)], minlength=c)[:c]
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


def class_balanced_indices(
    labels: torch.Tensor | np.ndarray, per_class: int, pool: np.ndarray | Sequence[int] | None = None, seed: int = 0
) -> np.ndarray:
    """A class-balanced sample: up to ``per_class`` indices of every class, drawn without replacement.

    This is the calibration set of neuron-interpolation fusion (a class-balanced sample from the union of the
    members' data). Classes with fewer samples give all they have.

    Args:
        labels: (N,) integer labels.
        per_class: samples per class (>= 1).
        pool: restrict the draw to these indices (default: all).
        seed: seed of the draw.

    Returns:
        Sorted int64 indices into ``labels``.
    """
    y = _labels_np(labels)
    if int(per_class) != per_class or per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1; got {per_class}")
    idx = np.arange(y.size) if pool is None else np.asarray(pool, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= y.size):
        raise ValueError(f"pool indices must be in [0, {y.size}); got range [{idx.min()}, {idx.max()}]")
    rng = np.random.default_rng([seed, 0xCB])
    picks = [rng.permutation(idx[y[idx] == c])[:per_class] for c in np.unique(y[idx])]
    return np.sort(np.concatenate(picks)).astype(np.int64) if picks else np.zeros(0, np.int64)


def subset(
    x: torch.Tensor, y: torch.Tensor, indices: np.ndarray | torch.Tensor | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x[indices], y[indices])`` with a bounds check (indices from the split functions)."""
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples; got {x.shape[0]} and {y.shape[0]}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= x.shape[0]):
        raise ValueError(f"indices must be in [0, {x.shape[0]}); got range [{int(idx.min())}, {int(idx.max())}]")
    return x[idx], y[idx]


def make_loader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, shuffle: bool = False, seed: int = 0
) -> torch.utils.data.DataLoader:
    """A DataLoader over in-memory tensors; with ``shuffle`` the order is fixed by ``seed``.

    Each epoch draws a new order from a generator seeded once, so two loaders built with the same seed
    give the same sequence of batches.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples; got {x.shape[0]} and {y.shape[0]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen
    )


LICENSE_DIR = "/usr/share/common-licenses"


def local_text_corpus(
    directory: str | None = LICENSE_DIR, fallback_chars: int = 300_000
) -> tuple[list[tuple[str, str]], str]:
    """Documents readable on this machine without a download, for character-level language models.

    The regular files of ``directory`` (default ``/usr/share/common-licenses``: GPL, LGPL, Apache, MPL, ...;
    symbolic links such as ``GPL -> GPL-3`` are skipped, so no text appears twice), sorted by name. When the
    directory is missing or empty, the ``.py`` files of Python's standard library
    (``sysconfig.get_paths()["stdlib"]``, sorted by relative path, ``test`` folders skipped) are read until
    ``fallback_chars`` characters are collected.

    Returns:
        ``(documents, source)``: a list of ``(name, text)`` pairs (non-empty texts, UTF-8 with undecodable bytes
        replaced) and a short description of where they came from ("licenses:<dir>" or "stdlib:<dir>").

    Raises:
        FileNotFoundError: neither source yields any text.
    """
    docs: list[tuple[str, str]] = []
    if directory and os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
            if text:
                docs.append((name, text))
        if docs:
            return docs, f"licenses:{directory}"
    stdlib = sysconfig.get_paths()["stdlib"]
    total = 0
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "idlelib", "site-packages", "__pycache__"))
        for name in sorted(files):
            if not name.endswith(".py") or total >= fallback_chars:
                continue
            path = os.path.join(root, name)
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()[: fallback_chars - total]
            if text:
                docs.append((os.path.relpath(path, stdlib), text))
                total += len(text)
        if total >= fallback_chars:
            break
    if not docs:
        raise FileNotFoundError(f"no text found in {directory!r} nor under the Python standard library {stdlib!r}")
    return docs, f"stdlib:{stdlib}"


def char_vocab(text: str) -> list[str]:
    """The sorted distinct characters of ``text`` (id i is ``vocab[i]``)."""
    return sorted(set(text))


def encode_chars(text: str, vocab: Sequence[str]) -> torch.Tensor:
    """Character ids of ``text`` under ``vocab`` as an int64 tensor (len(text),).

    Raises:
        ValueError: ``vocab`` has repeated entries or ``text`` holds a character outside it (named).
    """
    index = {c: i for i, c in enumerate(vocab)}
    if len(index) != len(vocab):
        raise ValueError(f"vocab must hold distinct characters; got {len(vocab)} entries, {len(index)} distinct")
    unknown = set(text) - index.keys()
    if unknown:
        raise ValueError(f"text holds characters outside the vocabulary: {sorted(unknown)[:10]!r}")
    return torch.tensor([index[c] for c in text], dtype=torch.int64)


def token_windows(ids: torch.Tensor, context: int, stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a token sequence into language-model windows: ``x[w] = ids[s : s + T]``, ``y[w] = ids[s + 1 : s + T + 1]``
    for ``s = w * stride`` (every window whole; the tail shorter than T + 1 is dropped).

    With ``stride = context`` (the default) the windows tile the sequence: every token of ``ids[1 : W * T + 1]``
    is a target exactly once (the evaluation windows); a smaller stride gives overlapping training windows.

    Args:
        ids: (L,) int64 token ids.
        context: T >= 1.
        stride: >= 1, default ``context``.

    Returns:
        ``(x, y)``, both int64 (W, T) with W = (L - T - 1) // stride + 1 (0 when L <= T).
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D (L,); got shape {tuple(ids.shape)}")
    if int(context) != context or context < 1:
        raise ValueError(f"context must be an integer >= 1; got {context}")
    step = context if stride is None else stride
    if int(step) != step or step < 1:
        raise ValueError(f"stride must be an integer >= 1; got {stride}")
    n = ids.numel()
    if n <= context:
        empty = torch.zeros((0, context), dtype=torch.int64)
        return empty, empty.clone()
    starts = torch.arange(0, n - context, step)
    offsets = torch.arange(context)
    x = ids[starts[:, None] + offsets]
    y = ids[starts[:, None] + offsets + 1]
    return x.long(), y.long()
