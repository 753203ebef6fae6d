"""The model zoo: ensembles of members trained by us on CPU, reproducible, cached on disk, loaded in one line.

The benchmarks of the issues "Fuse the models users actually have", "Neuron interpolation on any model" and
"Beat the trivial baselines" measure fusion on these members. Nothing here fuses anything: this module trains and
serves members, their data (training pool, calibration slice, test set) and the trivial baselines every accuracy
claim must include (each member, best member, ensemble, sub-ensembles, vanilla weight averaging)::

    from zoo import get_case, baselines          # from a script in bench/
    case = get_case("mnist/mlp/iid/K2")           # trains on first use, then loads from the cache
    rows = baselines(case)                        # accuracy / perplexity, FLOPs per sample, parameters

**Case names** (any name of this grammar works; :data:`DEFAULT_CASES` are the ones ``build`` trains):

* images: ``{dataset}/{arch}/{split}/K{k}[/shared_init][/tiny]`` with dataset ``mnist``, ``fmnist``
  (Fashion-MNIST) or ``digits`` (scikit-learn 8x8); arch ``mlp`` (ReLU), ``mlp_gelu``, ``mlp_celu`` (the user-written
  :class:`MLPNet`), ``cnn`` (the user-written :class:`SkipCNN`: ``torch.cat`` skip, in-place ReLU), ``vgg_bn``
  (:func:`pyfusion.models.vgg` with BatchNorm), ``resnet`` (:class:`pyfusion.models.ResNet`, basic blocks
  [1, 1, 1], base width 8: a ResNet-8) or ``vit`` (Hugging Face ``ViTForImageClassification``); split ``iid``
  (every member trains on the whole pool, different seeds), ``dirichlet{a}`` (per class, member shares ~
  Dirichlet(a, ..., a); ``dirichlet`` alone: the neuron-interpolation paper's ``linspace(1, 5, K)`` concentrations
  shuffled per class) or ``shard`` (disjoint class subsets); ``K`` >= 1 members;
* text: ``text/{arch}/K{k}[/tiny]`` with arch ``gpt2`` (``GPT2LMHeadModel``, tied embeddings) or ``llama_gqa``
  (``LlamaForCausalLM``, 4 query heads sharing 2 key/value heads, ``use_cache=False``), character-level on the
  texts of :func:`pyfusion.data.local_text_corpus`; every member sees the whole training text (different seeds).

``shared_init``: every member starts from the initialization of seed ``seeds[0]``; only the data order (and, for
non-IID splits, the data) differs. ``tiny``: a few-hundred-sample, two-epoch, narrow variant for tests.

**Seeds.** Member k of a case has training seed ``k`` (data order, dropout) and initialization seed ``k``
(``0`` for every member with ``shared_init``); splits use seed 0. A member depends only on its own definition
(dataset, architecture, its training indices, seeds, hyper-parameters), so cases that share a member share its
cache entry: the IID members of ``.../iid/K2`` are the first two of ``.../iid/K4``.

**Data.** Calibration data is a class-balanced slice held out of the training set (500 images per class on
MNIST / Fashion-MNIST, 20 on digits), never the test set; members train on the rest (the *pool*). Test: the
official test sets (digits: a stratified 25% split). Text: the documents are cut into blocks of 16 windows
(16 x 128 + 1 characters), and a seeded permutation deals 10% of the blocks to the test set, 5% to calibration and
the rest to training (so all three mix the same documents; no window crosses a block). Images are read from
``$PYFUSION_DATA`` (default ``/work/shared/data``), never downloaded.

**Cache.** ``$PYFUSION_ZOO`` (default ``~/.cache/pyfusion/zoo``): ``members/<dataset>-<arch>-<key>.safetensors``
(the state dict, ``safetensors``; never pickle) and ``.json`` (the member's definition, its training time, threads,
library versions and test / calibration metric). ``key`` is the SHA-256 of the member's definition including
:data:`ZOO_VERSION` and a fingerprint of its data; bump :data:`ZOO_VERSION` whenever a change alters training.
Files are written to a temporary name and renamed (the JSON, which records the weights' SHA-256, last), and a
per-member file lock keeps concurrent builds from training the same member twice.

**Determinism.** Training runs under ``torch.use_deterministic_algorithms(True, warn_only=True)`` with a pinned
number of threads (default 1; part of the member's definition, since the bits depend on it): with the same library
versions a member retrains bit-identically, in any process (checked across processes for MLP, VGG+BN, ResNet, ViT
and Llama members). On the loaded 2-core machine 2 threads made a digits ResNet 20x slower than 1.

CLI: ``python bench/zoo.py build [--cases PATTERN[,PATTERN]] [--list] [--md bench/results/zoo.md]`` and
``python bench/zoo.py show NAME``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pyfusion import data as pdata  # noqa: E402
from pyfusion import models as pmodels  # noqa: E402
from pyfusion.train import perplexity, predict_logits, train  # noqa: E402

__all__ = [
    "DEFAULT_CASES",
    "ZOO_VERSION",
    "BaselineRow",
    "Case",
    "CaseSpec",
    "MLPNet",
    "SkipCNN",
    "baselines",
    "best_subset",
    "best_within",
    "build_model",
    "cache_dir",
    "case_names",
    "combine_outputs",
    "count_flops",
    "get_case",
    "is_realizable",
    "metric_value",
    "parse_case",
    "subset_mean",
    "vanilla_average",
]

ZOO_VERSION = 1
HERE = os.path.dirname(os.path.abspath(__file__))
_DATA_CANDIDATES = [
    os.path.join(HERE, "..", "..", "shared", "data"),
    os.path.join(HERE, "..", "..", "..", "shared", "data"),
]

IMAGE_DATASETS = ("mnist", "fmnist", "digits")
IMAGE_ARCHS = ("mlp", "mlp_gelu", "mlp_celu", "cnn", "vgg_bn", "resnet", "vit")
TEXT_ARCHS = ("gpt2", "llama_gqa")


# --------------------------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------------------------

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "celu": nn.CELU}


class MLPNet(nn.Module):
    """A user-written MLP (not ``nn.Sequential``): ``flatten -> fc1 -> act -> fc2 -> act -> fc3``.

    Input ``(N, C, H, W)`` (flattened to ``in_features``), output logits ``(N, num_classes)``.
    """

    def __init__(self, in_features: int = 784, hidden: int = 256, num_classes: int = 10, activation: str = "relu"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}; got {activation!r}")
        self.fc1 = nn.Linear(in_features, hidden)
        self.act1 = _ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = _ACTIVATIONS[activation]()
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.flatten(x, 1)
        h = self.act1(self.fc1(h))
        h = self.act2(self.fc2(h))
        return self.fc3(h)


class SkipCNN(nn.Module):
    """A user-written CNN with a ``torch.cat`` skip and in-place ReLUs.

    ``conv1 -> relu_ -> pool``; ``cat([h, relu_(conv2(h))])`` (channels 2w); ``conv3 -> relu_ -> pool``;
    ``fc1 -> relu_ -> fc2``. Input ``(N, C, S, S)`` with S divisible by 4, output ``(N, num_classes)``.
    """

    def __init__(self, in_channels: int = 1, width: int = 16, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4; got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.relu3 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * (image_size // 4) ** 2, 4 * width)
        self.relu4 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool1(self.relu1(self.conv1(x)))
        h = torch.cat([h, self.relu2(self.conv2(h))], dim=1)
        h = self.pool2(self.relu3(self.conv3(h)))
        return self.fc2(self.relu4(self.fc1(torch.flatten(h, 1))))


def _image_geometry(dataset: str) -> tuple[int, int]:
    """(channels, side) of a data set's images."""
    return (1, 8) if dataset == "digits" else (1, 28)


def arch_config(arch: str, dataset: str, tiny: bool = False, vocab_size: int | None = None) -> dict[str, Any]:
    """The JSON-able constructor arguments of an architecture on a data set (what :func:`build_model` takes)."""
    if arch in TEXT_ARCHS:
        if vocab_size is None:
            raise ValueError(f"arch {arch!r} needs vocab_size")
        d, layers, ctx = (16, 1, 32) if tiny else (128, 2, 128)
        if arch == "gpt2":
            return {
                "vocab_size": vocab_size,
                "n_positions": ctx,
                "n_embd": d,
                "n_layer": layers,
                "n_head": 4,
                "n_inner": 4 * d,
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
                "tie_word_embeddings": True,
                "bos_token_id": None,
                "eos_token_id": None,
                "attn_implementation": "eager",
            }
        return {
            "vocab_size": vocab_size,
            "hidden_size": d,
            "intermediate_size": 4 * d * 2 // 3 if not tiny else 32,  # SwiGLU width ~ (8/3) d, as in Llama
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": ctx,
            "use_cache": False,
            "tie_word_embeddings": False,
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
            "attn_implementation": "eager",
        }
    channels, side = _image_geometry(dataset)
    if arch in ("mlp", "mlp_gelu", "mlp_celu"):
        act = {"mlp": "relu", "mlp_gelu": "gelu", "mlp_celu": "celu"}[arch]
        hidden = 32 if tiny else (128 if dataset == "digits" else 256)
        return {"in_features": channels * side * side, "hidden": hidden, "num_classes": 10, "activation": act}
    if arch == "cnn":
        return {"in_channels": channels, "width": 4 if tiny else 16, "num_classes": 10, "image_size": side}
    if arch == "vgg_bn":
        if tiny:
            widths: list[int | str] = [4, "M", 8, "M"]
        else:
            widths = [16, "M", 32, "M"] if dataset == "digits" else [16, "M", 32, "M", 64, "M"]
        return {"widths": widths, "in_channels": channels, "num_classes": 10, "image_size": side, "hidden": 64}
    if arch == "resnet":
        return {"blocks_per_stage": [1, 1, 1], "base_width": 4 if tiny else 8,
                "num_classes": 10, "in_channels": channels}  # fmt: skip
    if arch == "vit":
        return {
            "image_size": side,
            "patch_size": 7 if side == 28 else 2,
            "num_channels": channels,
            "hidden_size": 16 if tiny else 64,
            "num_hidden_layers": 1 if tiny else 3,
            "num_attention_heads": 4,
            "intermediate_size": 32 if tiny else 128,
            "num_labels": 10,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "attn_implementation": "eager",
        }
    raise ValueError(f"arch must be one of {IMAGE_ARCHS + TEXT_ARCHS}; got {arch!r}")


def build_model(arch: str, config: dict[str, Any]) -> nn.Module:
    """A fresh (randomly initialized from the current torch RNG) member of ``arch`` with ``config`` (from
    :func:`arch_config`). Hugging Face models use eager attention (explicit matmul / softmax: traceable, and
    every attention matmul is visible to :func:`count_flops`)."""
    cfg = dict(config)
    if arch in ("mlp", "mlp_gelu", "mlp_celu"):
        return MLPNet(**cfg)
    if arch == "cnn":
        return SkipCNN(**cfg)
    if arch == "vgg_bn":
        return pmodels.vgg(**cfg)
    if arch == "resnet":
        return pmodels.ResNet(pmodels.BasicBlock, **cfg)
    import transformers

    if arch == "vit":
        return transformers.ViTForImageClassification(transformers.ViTConfig(**cfg))
    if arch == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    if arch == "llama_gqa":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    raise ValueError(f"arch must be one of {IMAGE_ARCHS + TEXT_ARCHS}; got {arch!r}")


def _family(arch: str) -> str:
    return "mlp" if arch.startswith("mlp") else ("lm" if arch in TEXT_ARCHS else arch)


def train_config(arch: str, dataset: str, tiny: bool = False) -> dict[str, Any]:
    """Training hyper-parameters of ``arch`` on ``dataset`` (keyword arguments of :func:`pyfusion.train.train`,
    with ``batch_size`` and ``warmup_fraction`` of the total steps for the cosine schedule).

    Chosen so that a member trains in about 1-5 minutes on one (shared) CPU thread, with test accuracy on MNIST of
    about 97.8% (MLP), 99% (VGG), 98.6% (ResNet), 98% (ViT); see bench/results/zoo.md for every member."""
    fam = _family(arch)
    base: dict[str, Any] = {"optimizer": "adam", "lr": 1e-3, "batch_size": 128, "weight_decay": 0.0,
                            "lr_schedule": "cosine", "warmup_fraction": 0.0}  # fmt: skip
    if fam == "mlp":
        base["epochs"] = 60 if dataset == "digits" else 6
    elif fam in ("cnn", "vgg_bn", "resnet"):
        base["epochs"] = 40 if dataset == "digits" else 2
        if fam == "resnet":
            base["lr"] = 3e-3  # MNIST, 2 epochs: 98.6% at 3e-3 against 97.5% at 1e-3 (SGD 0.1 + momentum: 98.5%)
    elif fam == "vit":
        base.update(optimizer="adamw", lr=2e-3, weight_decay=0.05, lr_schedule="cosine", warmup_fraction=0.05)
        base["epochs"] = 60 if dataset == "digits" else 10
    elif fam == "lm":
        base.update(optimizer="adamw", lr=3e-3, weight_decay=0.01, batch_size=32, grad_clip=1.0,
                    lr_schedule="cosine", warmup_fraction=0.05, epochs=8)  # fmt: skip
    if dataset == "digits":
        base["batch_size"] = 64
    if tiny:
        base["epochs"] = 2
        base["batch_size"] = min(base["batch_size"], 32)
    return base


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def data_dir() -> str:
    """``$PYFUSION_DATA`` or the shared data folder next to the repository."""
    env = os.environ.get("PYFUSION_DATA")
    if env:
        return env
    return next((p for p in _DATA_CANDIDATES if os.path.isdir(os.path.join(p, "mnist"))), _DATA_CANDIDATES[0])


def cache_dir() -> str:
    """``$PYFUSION_ZOO`` or ``~/.cache/pyfusion/zoo``."""
    return os.environ.get("PYFUSION_ZOO") or os.path.join(os.path.expanduser("~"), ".cache", "pyfusion", "zoo")


_CALIB_PER_CLASS = {"mnist": 500, "fmnist": 500, "digits": 20}
_TINY = {"n_train": 300, "n_test": 200, "calib_per_class": 10, "text_chars_per_doc": 1500}
_TEXT_BLOCK_WINDOWS = 16  # text blocks of 16 evaluation windows
_TEXT_FRACTIONS = (0.05, 0.10)  # of the blocks: calibration, test (the rest trains)


@dataclass
class _Data:
    """The data of one (dataset, tiny) pair: pool (members train on subsets of it), calibration, test."""

    pool: tuple[Tensor, Tensor]
    calib: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    fingerprint: str
    info: dict[str, Any]
    vocab: list[str] | None = None


def _sha256_tensors(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _load_data(dataset: str, tiny: bool) -> _Data:
    """The data of ``dataset`` (memoized per process, per data folder)."""
    return _load_data_from(dataset, tiny, "" if dataset in ("digits", "text") else os.path.abspath(data_dir()))


@functools.lru_cache(maxsize=8)
def _load_data_from(dataset: str, tiny: bool, folder: str) -> _Data:
    if dataset == "text":
        return _load_text(tiny)
    if dataset == "digits":
        xtr, ytr = pdata.load_digits("train")
        xte, yte = pdata.load_digits("test")
        source = "sklearn.datasets.load_digits (stratified 25% test split, seed 0)"
    else:
        sub = os.path.join(folder, {"mnist": "mnist", "fmnist": "fashion-mnist"}[dataset])
        xtr, ytr = pdata.load_idx_dataset(sub, "train")
        xte, yte = pdata.load_idx_dataset(sub, "test")
        source = sub
    per_class = _TINY["calib_per_class"] if tiny else _CALIB_PER_CLASS[dataset]
    calib_idx = pdata.class_balanced_indices(ytr, per_class, seed=0)
    pool_idx = np.setdiff1d(np.arange(ytr.shape[0]), calib_idx)
    if tiny:
        pool_idx = np.sort(np.random.default_rng(0).permutation(pool_idx)[: _TINY["n_train"]])
        xte, yte = xte[: _TINY["n_test"]], yte[: _TINY["n_test"]]
    info = {"source": source, "n_pool": int(pool_idx.size), "n_calib": int(calib_idx.size), "n_test": int(yte.numel())}
    return _Data(
        pool=pdata.subset(xtr, ytr, pool_idx),
        calib=pdata.subset(xtr, ytr, calib_idx),
        test=(xte, yte),
        fingerprint=_sha256_tensors(xtr, ytr, xte, yte),
        info=info,
    )


def _load_text(tiny: bool) -> _Data:
    docs, source = pdata.local_text_corpus()
    if tiny:
        docs = [(n, t[: _TINY["text_chars_per_doc"]]) for n, t in docs]
    full = "".join(t for _, t in docs)
    vocab = pdata.char_vocab(full)
    context = arch_config("gpt2", "text", tiny, vocab_size=len(vocab))["n_positions"]
    # Blocks of 16 evaluation windows (16 T + 1 characters) cut from every document, dealt to test / calibration /
    # train by a seeded permutation, so that the three parts are drawn from the same mix of documents. Windows never
    # cross a block boundary.
    size = _TEXT_BLOCK_WINDOWS * context + 1
    blocks = [t[i : i + size] for _, t in docs for i in range(0, len(t), size)]
    blocks = [b for b in blocks if len(b) > context]
    order = np.random.default_rng([0, 0x7E]).permutation(len(blocks))
    n_test = max(1, int(round(_TEXT_FRACTIONS[1] * len(blocks))))
    n_calib = max(1, int(round(_TEXT_FRACTIONS[0] * len(blocks))))
    parts = {"test": order[:n_test], "calib": order[n_test : n_test + n_calib], "train": order[n_test + n_calib :]}
    xy: dict[str, tuple[Tensor, Tensor]] = {}
    for part, idx in parts.items():
        stride = context // 2 if part == "train" else context
        windows = [pdata.token_windows(pdata.encode_chars(blocks[i], vocab), context, stride) for i in sorted(idx)]
        xy[part] = (torch.cat([w[0] for w in windows]), torch.cat([w[1] for w in windows]))
    info = {
        "source": source,
        "files": [n for n, _ in docs],
        "n_chars": len(full),
        "vocab_size": len(vocab),
        "context": context,
        "blocks": {part: int(idx.size) for part, idx in parts.items()},
        "block_chars": size,
        "chars": {part: int(sum(len(blocks[i]) for i in idx)) for part, idx in parts.items()},
        "tokens": {part: int(v[1].numel()) for part, v in xy.items()},
        "windows": {part: int(v[0].shape[0]) for part, v in xy.items()},
        "n_pool": int(xy["train"][0].shape[0]),
        "n_calib": int(xy["calib"][0].shape[0]),
        "n_test": int(xy["test"][0].shape[0]),
    }
    fingerprint = hashlib.sha256(("\x00".join(f"{n}\x01{t}" for n, t in docs)).encode()).hexdigest()
    return _Data(pool=xy["train"], calib=xy["calib"], test=xy["test"], fingerprint=fingerprint, info=info, vocab=vocab)


def _split_indices(labels: Tensor, split: str, k: int, index: int, seed: int = 0) -> np.ndarray:
    """Indices into the pool of member ``index`` of ``k`` under ``split``."""
    n = labels.shape[0]
    if split == "iid":
        return np.arange(n, dtype=np.int64)
    if split == "shard":
        return pdata.shard_split(labels, k, seed=seed)[index]
    if split == "dirichlet":
        return pdata.dirichlet_split(labels, k, seed=seed)[index]
    m = re.fullmatch(r"dirichlet([0-9]*\.?[0-9]+)", split)
    if m:
        return pdata.dirichlet_split(labels, k, concentrations=np.full(k, float(m.group(1))), seed=seed)[index]
    raise ValueError(f"split must be 'iid', 'shard', 'dirichlet' or 'dirichlet<a>' (e.g. dirichlet0.5); got {split!r}")


# --------------------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseSpec:
    """The definition of a case (see the module docstring for the name grammar)."""

    dataset: str
    arch: str
    split: str
    k: int
    shared_init: bool = False
    tiny: bool = False

    @property
    def name(self) -> str:
        if self.dataset == "text":
            parts = ["text", self.arch, f"K{self.k}"]
        else:
            parts = [self.dataset, self.arch, self.split, f"K{self.k}"]
        if self.shared_init:
            parts.append("shared_init")
        if self.tiny:
            parts.append("tiny")
        return "/".join(parts)

    @property
    def task(self) -> str:
        return "lm" if self.dataset == "text" else "classification"

    @property
    def seeds(self) -> list[int]:
        return list(range(self.k))

    @property
    def init_seeds(self) -> list[int]:
        return [0] * self.k if self.shared_init else self.seeds


def parse_case(name: str) -> CaseSpec:
    """The :class:`CaseSpec` of a case name (``mnist/mlp/iid/K2``, ``text/gpt2/K2``, ...).

    Raises:
        ValueError: the name does not follow the grammar (the message says which part is wrong).
    """
    parts = name.strip("/").split("/")
    flags = {"shared_init": False, "tiny": False}
    while parts and parts[-1] in flags:
        flags[parts.pop()] = True
    if not parts:
        raise ValueError(f"case name {name!r} is empty")
    if parts[0] == "text":
        if len(parts) != 3:
            raise ValueError(f"a text case is 'text/<arch>/K<k>[/tiny]'; got {name!r}")
        dataset, arch, split, kpart = "text", parts[1], "iid", parts[2]
        if arch not in TEXT_ARCHS:
            raise ValueError(f"text arch must be one of {TEXT_ARCHS}; got {arch!r} in {name!r}")
    else:
        if len(parts) != 4:
            raise ValueError(f"an image case is '<dataset>/<arch>/<split>/K<k>[/shared_init][/tiny]'; got {name!r}")
        dataset, arch, split, kpart = parts
        if dataset not in IMAGE_DATASETS:
            raise ValueError(f"dataset must be one of {IMAGE_DATASETS + ('text',)}; got {dataset!r} in {name!r}")
        if arch not in IMAGE_ARCHS:
            raise ValueError(f"image arch must be one of {IMAGE_ARCHS}; got {arch!r} in {name!r}")
        if not re.fullmatch(r"iid|shard|dirichlet([0-9]*\.?[0-9]+)?", split):
            raise ValueError(f"split must be iid, shard, dirichlet or dirichlet<a>; got {split!r} in {name!r}")
        if split.startswith("dirichlet") and split != "dirichlet" and not float(split[9:]) > 0:
            raise ValueError(f"a Dirichlet concentration must be > 0; got {split!r} in {name!r}")
    m = re.fullmatch(r"K([1-9][0-9]*)", kpart)
    if not m:
        raise ValueError(f"the member count must read K<k> with k >= 1; got {kpart!r} in {name!r}")
    k = int(m.group(1))
    if split == "shard" and k > 10:
        raise ValueError(f"a sharded split needs k <= 10 (the number of classes); got k = {k} in {name!r}")
    return CaseSpec(dataset, arch, split, k, flags["shared_init"], flags["tiny"])


def _default_cases() -> list[str]:
    names: list[str] = []
    for k in (2, 4):
        for ds in ("mnist", "fmnist"):
            for arch in ("mlp", "vgg_bn", "resnet"):
                for split in ("iid", "dirichlet0.5", "shard"):
                    names.append(f"{ds}/{arch}/{split}/K{k}")
    names += [f"digits/mlp/{s}/K{k}" for k in (2, 4, 8) for s in ("iid", "dirichlet0.5", "shard")]
    names += [f"digits/vgg_bn/iid/K{k}" for k in (2, 4, 8)]
    names += ["mnist/mlp/iid/K8", "fmnist/mlp/iid/K8"]
    names += ["mnist/mlp/iid/K2/shared_init", "fmnist/mlp/iid/K2/shared_init", "digits/mlp/iid/K2/shared_init"]
    names += ["mnist/mlp_gelu/iid/K2", "mnist/mlp_celu/iid/K2", "mnist/cnn/iid/K2"]
    names += ["mnist/vit/iid/K2", "mnist/vit/dirichlet0.5/K2"]
    names += ["text/gpt2/K2", "text/llama_gqa/K2"]
    return sorted(dict.fromkeys(names), key=lambda n: parse_case(n).k)  # K = 2 first, then 4, then 8


DEFAULT_CASES: list[str] = _default_cases()


def case_names(pattern: str | None = None) -> list[str]:
    """:data:`DEFAULT_CASES` matching ``pattern`` (comma-separated ``fnmatch`` globs, e.g. ``mnist/*/iid/K2``);
    a pattern without wildcards that is a valid case name is returned as is (any grammatical name works)."""
    if not pattern:
        return list(DEFAULT_CASES)
    out: list[str] = []
    for pat in (p.strip() for p in pattern.split(",") if p.strip()):
        hits = [n for n in DEFAULT_CASES if fnmatch.fnmatchcase(n, pat)]
        if not hits and not any(c in pat for c in "*?["):
            hits = [parse_case(pat).name]
        out += hits
    return list(dict.fromkeys(out))


def _member_definition(spec: CaseSpec, index: int, data: _Data, threads: int = 1) -> dict[str, Any]:
    """Everything that determines member ``index`` of ``spec`` (hashed into its cache key). The training threads
    are part of it: a different number of threads changes the floating-point reduction order, hence the bits."""
    vocab = len(data.vocab) if data.vocab is not None else None
    subset: dict[str, Any] = {"split": spec.split}
    if spec.split != "iid":
        subset.update(k=spec.k, index=index, split_seed=0)
    return {
        "zoo_version": ZOO_VERSION,
        "dataset": spec.dataset,
        "tiny": spec.tiny,
        "data_fingerprint": data.fingerprint,
        "data": {k: v for k, v in data.info.items() if k in ("n_pool", "n_calib", "n_test", "context")},
        "arch": spec.arch,
        "arch_config": arch_config(spec.arch, spec.dataset, spec.tiny, vocab_size=vocab),
        "subset": subset,
        "init_seed": spec.init_seeds[index],
        "seed": spec.seeds[index],
        "train": train_config(spec.arch, spec.dataset, spec.tiny),
        "threads": threads,
    }


def _key(definition: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write ``path`` by ``write(tmp)`` to a temporary file in the same folder, fsync, then rename over it."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; a no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _pinned_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "python": platform.python_version(), "numpy": np.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _eval_metric(model: nn.Module, xy: tuple[Tensor, Tensor], task: str, batch_size: int = 500) -> float:
    logits, y = predict_logits(model, pdata.make_loader(*xy, batch_size=batch_size))
    return metric_value(logits.double(), y, task, "logits")


def _member_paths(root: str, definition: dict[str, Any], key: str) -> tuple[str, str]:
    stem = os.path.join(root, "members", f"{definition['dataset']}-{definition['arch']}-{key}")
    return stem + ".safetensors", stem + ".json"


def _load_member(definition: dict[str, Any], weights: str, record: dict[str, Any]) -> nn.Module | None:
    """The cached member, or None when its file is missing or does not match the recorded SHA-256."""
    from safetensors.torch import load_model

    if not os.path.isfile(weights) or _sha256_file(weights) != record.get("weights_sha256"):
        warnings.warn(
            f"zoo cache: {weights} is missing or does not match the SHA-256 in its manifest; it is not loaded "
            "(it will be retrained when training is allowed)",
            stacklevel=3,
        )
        return None
    model = build_model(definition["arch"], definition["arch_config"])
    load_model(model, weights, strict=True)
    return model.eval()


def _train_member(definition: dict[str, Any], data: _Data, verbose: bool) -> tuple[nn.Module, dict]:
    hp = dict(definition["train"])
    sub = definition["subset"]
    if sub["split"] == "iid":
        idx = np.arange(data.pool[0].shape[0], dtype=np.int64)
    else:
        idx = _split_indices(data.pool[1], sub["split"], sub["k"], sub["index"], sub["split_seed"])
    x, y = pdata.subset(*data.pool, idx)
    if x.shape[0] == 0:
        raise ValueError(f"member {definition['subset']} of {definition['dataset']} has no training samples")
    batch_size = int(hp.pop("batch_size"))
    warmup = float(hp.pop("warmup_fraction", 0.0))
    loader = pdata.make_loader(x, y, batch_size=batch_size, shuffle=True, seed=definition["seed"])
    if hp.get("lr_schedule") == "cosine":
        hp["warmup_steps"] = int(round(warmup * hp["epochs"] * len(loader)))
    task = "lm" if definition["dataset"] == "text" else "classification"
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with _pinned_threads(definition["threads"]), _deterministic():
        torch.manual_seed(definition["init_seed"])
        model = build_model(definition["arch"], definition["arch_config"])
        history = train(model, loader, seed=definition["seed"], **hp)
        train_time = time.perf_counter() - t0
        test_metric = _eval_metric(model, data.test, task)
        calib_metric = _eval_metric(model, data.calib, task)
    record = {
        "definition": definition,
        "metric": "perplexity" if task == "lm" else "accuracy",
        "test": test_metric,
        "calib": calib_metric,
        "train_time_s": round(train_time, 2),
        "train_samples": int(x.shape[0]),
        "steps": int(hp["epochs"] * len(loader)),
        "loss_history": [round(v, 5) for v in history],
        "threads": definition["threads"],
        "load_average_at_start": [round(v, 2) for v in load0],
        "versions": _versions(),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if verbose:
        what = f"ppl {test_metric:.3f}" if task == "lm" else f"test acc {100 * test_metric:.2f}%"
        print(f"  trained {definition['dataset']}/{definition['arch']} seed {definition['seed']} "
              f"({x.shape[0]} samples, {record['steps']} steps): {train_time:.1f} s, {what}", flush=True)  # fmt: skip
    return model.eval(), record


def _get_member(
    definition: dict[str, Any], data: _Data, root: str, train_missing: bool, verbose: bool
) -> tuple[nn.Module, dict]:
    from safetensors.torch import save_model

    key = _key(definition)
    weights, manifest = _member_paths(root, definition, key)

    def cached() -> tuple[nn.Module, dict] | None:
        if not os.path.isfile(manifest):
            return None
        with open(manifest) as fh:
            record = json.load(fh)
        model = _load_member(definition, weights, record)
        return None if model is None else (model, record)

    hit = cached()
    if hit is not None:
        return hit
    if not train_missing:
        raise FileNotFoundError(
            f"member {key} ({definition['dataset']}/{definition['arch']}, seed {definition['seed']}) is not in the "
            f"zoo cache {root}; build it with `python bench/zoo.py build` or call get_case(..., train_missing=True)"
        )
    with _file_lock(os.path.join(root, "locks", key + ".lock")):
        hit = cached()  # another process may have trained it while we waited
        if hit is not None:
            return hit
        model, record = _train_member(definition, data, verbose)
        _atomic_write(weights, lambda tmp: save_model(model, tmp))
        record["key"] = key
        record["weights_sha256"] = _sha256_file(weights)
        record["weights_bytes"] = os.path.getsize(weights)
        _atomic_write(manifest, lambda tmp: _write_text(tmp, json.dumps(record, indent=1, sort_keys=True)))
    return model, record


@dataclass
class Case:
    """A trained ensemble and its data.

    Attributes:
        name: canonical case name.
        spec: its :class:`CaseSpec`.
        members: the K members (eval mode, CPU, float32).
        train: ``(x, y)`` the training pool (the training set minus the calibration slice); member k trained on
            ``train[member_indices[k]]``. Text: windows ``(W, T)`` of input ids and next-token targets.
        member_indices: K int64 index arrays into ``train``.
        calib: ``(x, y)`` held out of the training set (class-balanced), never the test set.
        test: ``(x, y)`` the test set.
        seeds: each member's training seed (data order, dropout).
        init_seeds: each member's initialization seed (all equal with ``shared_init``).
        records: each member's cache manifest (definition, ``test`` / ``calib`` metric, ``train_time_s``,
            ``threads``, versions, ``key``).
        data_info: where the data came from and its sizes (text: files, characters, vocabulary, context).
        vocab: the characters of a text case (id i is ``vocab[i]``), else None.
    """

    name: str
    spec: CaseSpec
    members: list[nn.Module]
    train: tuple[Tensor, Tensor]
    member_indices: list[np.ndarray]
    calib: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    seeds: list[int]
    init_seeds: list[int]
    records: list[dict[str, Any]]
    data_info: dict[str, Any]
    vocab: list[str] | None = None
    _outputs: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def k(self) -> int:
        return len(self.members)

    @property
    def task(self) -> str:
        """``"classification"`` or ``"lm"`` (causal language model)."""
        return self.spec.task

    @property
    def metric(self) -> str:
        """``"accuracy"`` (higher is better) or ``"perplexity"`` (lower is better)."""
        return "perplexity" if self.task == "lm" else "accuracy"

    @property
    def example(self) -> Tensor:
        """One input ``(1, ...)`` (for :func:`count_flops` / ``pyfusion.cost``)."""
        return self.test[0][:1]

    @property
    def member_metrics(self) -> list[float]:
        """Each member's test accuracy / perplexity, as measured after training."""
        return [float(r["test"]) for r in self.records]

    @property
    def train_time_s(self) -> float:
        """Total training time of the members (seconds, as recorded when each was trained)."""
        return float(sum(r["train_time_s"] for r in self.records))

    def member_data(self, k: int) -> tuple[Tensor, Tensor]:
        """The training data of member ``k``."""
        return pdata.subset(*self.train, self.member_indices[k])

    def class_shares(self) -> np.ndarray:
        """(K, C): member k's share of class c of the training pool (:func:`pyfusion.data.class_shares`)."""
        if self.task != "classification":
            raise ValueError(f"class_shares needs a classification case; {self.name} is a language model")
        return pdata.class_shares(self.train[1], self.member_indices, 10)

    def loader(self, split: str = "test", batch_size: int = 500) -> torch.utils.data.DataLoader:
        """An unshuffled loader of ``(x, y)`` over ``"train"``, ``"calib"`` or ``"test"``."""
        return pdata.make_loader(*self._split(split), batch_size=batch_size)

    def calib_inputs(self, n: int | None = None, batch_size: int = 500) -> list[Tensor]:
        """The first ``n`` calibration inputs (default all) as a list of batches: the ``data`` of ``pyfusion.fuse``."""
        x = self.calib[0] if n is None else self.calib[0][:n]
        return [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]

    def new_member(self) -> nn.Module:
        """A fresh, untrained module of the members' architecture (a ``factory`` for loading fused files)."""
        d = self.records[0]["definition"]
        return build_model(d["arch"], d["arch_config"])

    def outputs(self, split: str = "test") -> Tensor:
        """Every member's logits on ``split``: ``(K, N, C)`` (text: ``(K, W, T, V)``), float32, memoized."""
        if split not in self._outputs:
            loader = self.loader(split)
            self._outputs[split] = torch.stack([predict_logits(m, loader)[0] for m in self.members])
        return self._outputs[split]

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        if split not in ("train", "calib", "test"):
            raise ValueError(f"split must be 'train', 'calib' or 'test'; got {split!r}")
        return getattr(self, split)


def get_case(
    name: str,
    *,
    cache: str | None = None,
    train_missing: bool = True,
    threads: int | None = None,
    verbose: bool = False,
) -> Case:
    """Load case ``name`` from the zoo cache, training (and caching) the members that are missing.

    Args:
        name: a case name (module docstring), e.g. ``"mnist/vgg_bn/dirichlet0.5/K4"``.
        cache: cache folder (default :func:`cache_dir`: ``$PYFUSION_ZOO`` or ``~/.cache/pyfusion/zoo``).
        train_missing: train members that are not cached (else raise ``FileNotFoundError``).
        threads: torch threads of training (default ``$PYFUSION_ZOO_THREADS`` or 1). Part of each member's
            definition (the bits depend on it), so members trained with other thread counts are other cache entries.
        verbose: print a line per member trained.

    Returns:
        The :class:`Case`.
    """
    spec = parse_case(name)
    root = cache or cache_dir()
    nthreads = int(threads or os.environ.get("PYFUSION_ZOO_THREADS") or 1)
    if nthreads < 1:
        raise ValueError(f"threads must be >= 1; got {nthreads}")
    data = _load_data(spec.dataset, spec.tiny)
    members, records, indices = [], [], []
    for i in range(spec.k):
        definition = _member_definition(spec, i, data, nthreads)
        model, record = _get_member(definition, data, root, train_missing, verbose)
        members.append(model)
        records.append(record)
        if spec.split == "iid":
            indices.append(np.arange(data.pool[0].shape[0], dtype=np.int64))
        else:
            indices.append(_split_indices(data.pool[1], spec.split, spec.k, i, 0))
    return Case(
        name=spec.name,
        spec=spec,
        members=members,
        train=data.pool,
        member_indices=indices,
        calib=data.calib,
        test=data.test,
        seeds=spec.seeds,
        init_seeds=spec.init_seeds,
        records=records,
        data_info=dict(data.info),
        vocab=data.vocab,
    )


# --------------------------------------------------------------------------------------------------------------
# Trivial baselines
# --------------------------------------------------------------------------------------------------------------


def count_flops(model: nn.Module, example: Tensor) -> int:
    """FLOPs per sample of one forward pass: 2 x multiply-accumulates of every matmul, linear and convolution
    (``torch.utils.flop_counter.FlopCounterMode``: ``mm`` / ``addmm`` / ``bmm`` / ``convolution``; attention's
    ``QK^T`` and ``AV`` included when attention is eager, as in the zoo's Hugging Face members; GPT-2's ``Conv1D``
    included). Normalization, activations, softmax and pooling are not counted. The model's mode is restored.

    On Linear / Conv-only networks this equals ``pyfusion.cost(model, example).flops``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if example.dim() < 1 or example.shape[0] < 1:
        raise ValueError(f"example must have a non-empty batch dimension; got shape {tuple(example.shape)}")
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return int(counter.get_total_flops()) // int(example.shape[0])


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def combine_outputs(outputs: Tensor, weights: Tensor | Sequence[float], combine: str = "logits") -> Tensor:
    """The ensemble output ``sum_k w_k z_k`` (``"logits"``) or ``sum_k w_k softmax(z_k)`` (``"probs"``), float64.

    Args:
        outputs: ``(K, ..., C)`` member logits.
        weights: ``(K,)`` member weights (lambda; not renormalized).
        combine: ``"logits"`` or ``"probs"``.
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (outputs.shape[0],):
        raise ValueError(f"weights must have shape ({outputs.shape[0]},); got {tuple(w.shape)}")
    z = outputs.double()
    if combine == "probs":
        z = torch.softmax(z, dim=-1)
    elif combine != "logits":
        raise ValueError(f"combine must be 'logits' or 'probs'; got {combine!r}")
    return torch.tensordot(w, z, dims=1)


def metric_value(combined: Tensor, targets: Tensor, task: str, combine: str = "logits") -> float:
    """Accuracy (classification: argmax of ``combined`` (N, C) against (N,)) or perplexity (``"lm"``: of the
    logits, or of the probabilities when ``combine == "probs"``, against (N, T) next-token targets)."""
    if task == "classification":
        return float((combined.argmax(-1) == targets).double().mean())
    if task != "lm":
        raise ValueError(f"task must be 'classification' or 'lm'; got {task!r}")
    if combine == "logits":
        return perplexity(combined, targets)
    p = combined.reshape(-1, combined.shape[-1]).gather(1, targets.reshape(-1, 1)).clamp_min(1e-300)
    return math.exp(float(-torch.log(p).mean()))


def _nll(combined: Tensor, targets: Tensor, combine: str) -> float:
    flat = combined.reshape(-1, combined.shape[-1])
    logp = torch.log_softmax(flat, 1) if combine == "logits" else torch.log(flat.clamp_min(1e-300))
    return float(-logp.gather(1, targets.reshape(-1, 1)).mean())


def _better(a: float, b: float, task: str) -> bool:
    return a > b if task == "classification" else a < b


def _subset_weights(lambdas: Tensor, subset: Sequence[int]) -> Tensor:
    w = torch.zeros_like(lambdas)
    idx = list(subset)
    w[idx] = lambdas[idx] / lambdas[idx].sum()
    return w


def best_subset(
    outputs: Tensor, targets: Tensor, m: int, task: str, lambdas: Tensor | None = None, combine: str = "logits"
) -> tuple[tuple[int, ...], float]:
    """The m-subset of members whose ensemble (lambdas renormalized over the subset) is best on ``(outputs,
    targets)`` (use calibration data): highest accuracy / lowest perplexity; ties go to the lower negative
    log-likelihood, then to the first subset in ``itertools.combinations`` order.

    Args:
        outputs: ``(K, N, C)`` (or ``(K, W, T, V)``) member logits.
        targets: ``(N,)`` labels (or ``(W, T)``).
        m: subset size, 1 <= m <= K.

    Returns:
        ``(subset, metric on these data)``.
    """
    k = outputs.shape[0]
    if not 1 <= m <= k:
        raise ValueError(f"m must be in [1, {k}]; got {m}")
    lam = torch.full((k,), 1.0 / k, dtype=torch.float64) if lambdas is None else torch.as_tensor(lambdas).double()
    best: tuple[tuple[int, ...], float, float] | None = None
    for sub in itertools.combinations(range(k), m):
        out = combine_outputs(outputs, _subset_weights(lam, sub), combine)
        value, nll = metric_value(out, targets, task, combine), _nll(out, targets, combine)
        if best is None or _better(value, best[1], task) or (value == best[1] and nll < best[2]):
            best = (sub, value, nll)
    assert best is not None
    return best[0], best[1]


def subset_mean(
    outputs: Tensor, targets: Tensor, m: int, task: str, lambdas: Tensor | None = None, combine: str = "logits"
) -> float:
    """The mean over all C(K, m) member subsets of the subset ensemble's metric (the expected metric of a random
    m-subset; for perplexity, the mean of the subsets' perplexities)."""
    k = outputs.shape[0]
    if not 1 <= m <= k:
        raise ValueError(f"m must be in [1, {k}]; got {m}")
    lam = torch.full((k,), 1.0 / k, dtype=torch.float64) if lambdas is None else torch.as_tensor(lambdas).double()
    values = [
        metric_value(combine_outputs(outputs, _subset_weights(lam, sub), combine), targets, task, combine)
        for sub in itertools.combinations(range(k), m)
    ]
    return float(np.mean(values))


def vanilla_average(members: Sequence[nn.Module], lambdas: Sequence[float] | Tensor | None = None) -> nn.Module:
    """Vanilla weight averaging ``theta = sum_k lambda_k theta_k`` of every floating-point parameter and buffer
    (BatchNorm running statistics averaged too, not recalibrated; integer buffers such as ``num_batches_tracked``
    from member 0). Plain torch, no alignment; the members are not modified.

    Raises:
        ValueError: members with different state-dict keys or shapes, or lambdas of the wrong shape.
    """
    if not members:
        raise ValueError("members must hold at least one model")
    k = len(members)
    lam = torch.full((k,), 1.0 / k, dtype=torch.float64) if lambdas is None else torch.as_tensor(lambdas).double()
    if lam.shape != (k,):
        raise ValueError(f"lambdas must have shape ({k},); got {tuple(lam.shape)}")
    states = [m.state_dict() for m in members]
    for i, s in enumerate(states[1:], 1):
        if s.keys() != states[0].keys() or any(s[n].shape != states[0][n].shape for n in s):
            raise ValueError(f"member {i} has a different state dict (keys or shapes) than member 0")
    avg = {}
    for n, v in states[0].items():
        if v.is_floating_point():
            avg[n] = sum(float(lam[i]) * states[i][n].double() for i in range(k)).to(v.dtype)
        else:
            avg[n] = v.clone()
    out = copy.deepcopy(members[0])
    out.load_state_dict(avg)
    return out.eval()


@dataclass(frozen=True)
class BaselineRow:
    """One trivial baseline.

    Attributes:
        method: e.g. ``"member 0"``, ``"best member (calibration)"``, ``"ensemble (logits)"``,
            ``"sub-ensemble best 2/4 (calibration, logits)"``, ``"sub-ensemble mean 2/4 (logits)"``,
            ``"vanilla average"``.
        members: the members it runs (all K for a mean over subsets and for the vanilla average).
        m: members executed at inference (1 for a member or the vanilla average).
        metric: ``"accuracy"`` or ``"perplexity"``.
        value: the metric on the evaluation split.
        calib_value: the metric on the calibration data (None where it is not computed).
        flops: FLOPs per sample (``m`` x one member's).
        params: parameters stored (``m`` x one member's).
        flops_ratio: ``flops`` / the ensemble's FLOPs.
    """

    method: str
    members: tuple[int, ...]
    m: int
    metric: str
    value: float
    calib_value: float | None
    flops: int
    params: int
    flops_ratio: float

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def baselines(
    case: Case,
    *,
    lambdas: Sequence[float] | Tensor | None = None,
    split: str = "test",
    combines: Sequence[str] = ("logits", "probs"),
    flop_counter: Callable[[nn.Module, Tensor], int] | None = None,
    vanilla: bool = True,
) -> list[BaselineRow]:
    """The trivial baselines of a case, evaluated on ``split`` (selections are made on the calibration data).

    Rows: every member; the best member chosen on calibration data, and the best on ``split`` (an oracle, the
    strict reference for "gain over the best member"); the mean member; for every m in [2, K - 1] and every
    ``combine``, the best m-subset chosen on calibration data and the mean over all m-subsets (FLOPs m/K of the
    ensemble); the ensemble ``sum_k lambda_k z_k`` of logits and ``sum_k lambda_k softmax(z_k)`` of probabilities;
    for non-IID classification cases the probability ensemble weighted per class by each member's class share
    (the neuron-interpolation paper's ensemble); and vanilla weight averaging (:func:`vanilla_average`).

    Args:
        case: from :func:`get_case`.
        lambdas: member weights (K,), default uniform (sub-ensembles renormalize them over the subset).
        split: ``"test"`` (default) or ``"calib"``.
        combines: which ensemble rules get sub-ensemble rows.
        flop_counter: ``f(model, example) -> FLOPs per sample`` (default :func:`count_flops`; pass
            ``lambda m, x: pyfusion.cost(m, x).flops`` to count like ``pyfusion.cost``).
        vanilla: include the vanilla average (it evaluates one more model).
    """
    k = case.k
    lam = torch.full((k,), 1.0 / k, dtype=torch.float64) if lambdas is None else torch.as_tensor(lambdas).double()
    if lam.shape != (k,) or not torch.isclose(lam.sum(), torch.tensor(1.0, dtype=torch.float64)):
        raise ValueError(f"lambdas must have shape ({k},) and sum to 1; got {lam.tolist()}")
    counter = flop_counter or count_flops
    flops = [int(counter(m, case.example)) for m in case.members]
    params = [_params(m) for m in case.members]
    f1, p1 = flops[0], params[0]
    ens_flops, ens_params = sum(flops), sum(params)
    task, metric = case.task, case.metric
    out_eval, y_eval = case.outputs(split), case._split(split)[1]
    out_cal, y_cal = case.outputs("calib"), case.calib[1]
    rows: list[BaselineRow] = []

    def row(method: str, members: Sequence[int], m: int, value: float, cal: float | None, fl: int, pa: int) -> None:
        rows.append(BaselineRow(method, tuple(members), m, metric, float(value), cal, int(fl), int(pa), fl / ens_flops))

    one_hot = [torch.eye(k, dtype=torch.float64)[i] for i in range(k)]
    member_eval = [metric_value(combine_outputs(out_eval, one_hot[i]), y_eval, task) for i in range(k)]
    member_cal = [metric_value(combine_outputs(out_cal, one_hot[i]), y_cal, task) for i in range(k)]
    for i in range(k):
        row(f"member {i}", (i,), 1, member_eval[i], member_cal[i], flops[i], params[i])
    (b,), _ = best_subset(out_cal, y_cal, 1, task)
    row("best member (calibration)", (b,), 1, member_eval[b], member_cal[b], flops[b], params[b])
    o = max(range(k), key=lambda i: member_eval[i] if task == "classification" else -member_eval[i])
    row(f"best member ({split}, oracle)", (o,), 1, member_eval[o], member_cal[o], flops[o], params[o])
    row("mean member", tuple(range(k)), 1, float(np.mean(member_eval)), float(np.mean(member_cal)), f1, p1)
    for combine in combines:
        for m in range(2, k):
            sub, cal = best_subset(out_cal, y_cal, m, task, lam, combine)
            value = metric_value(combine_outputs(out_eval, _subset_weights(lam, sub), combine), y_eval, task, combine)
            row(f"sub-ensemble best {m}/{k} (calibration, {combine})", sub, m, value, cal, m * f1, m * p1)
            mean_eval = subset_mean(out_eval, y_eval, m, task, lam, combine)
            mean_cal = subset_mean(out_cal, y_cal, m, task, lam, combine)
            row(f"sub-ensemble mean {m}/{k} ({combine})", tuple(range(k)), m, mean_eval, mean_cal, m * f1, m * p1)
    for combine in ("logits", "probs"):
        value = metric_value(combine_outputs(out_eval, lam, combine), y_eval, task, combine)
        cal = metric_value(combine_outputs(out_cal, lam, combine), y_cal, task, combine)
        row(f"ensemble ({combine})", tuple(range(k)), k, value, cal, ens_flops, ens_params)
    if task == "classification" and case.spec.split != "iid":
        shares = torch.as_tensor(case.class_shares())  # (K, C)
        probs_eval = torch.softmax(out_eval.double(), -1) * shares[:, None, :]
        probs_cal = torch.softmax(out_cal.double(), -1) * shares[:, None, :]
        value = metric_value(torch.tensordot(lam, probs_eval, dims=1), y_eval, task, "probs")
        cal = metric_value(torch.tensordot(lam, probs_cal, dims=1), y_cal, task, "probs")
        row("ensemble (probs x class shares)", tuple(range(k)), k, value, cal, ens_flops, ens_params)
    if vanilla:
        avg = vanilla_average(case.members, lam)
        x_eval, x_cal = case._split(split)[0], case.calib[0]
        z_eval = predict_logits(avg, pdata.make_loader(x_eval, y_eval, 500))[0]
        z_cal = predict_logits(avg, pdata.make_loader(x_cal, y_cal, 500))[0]
        row("vanilla average", tuple(range(k)), 1, metric_value(z_eval.double(), y_eval, task),
            metric_value(z_cal.double(), y_cal, task), int(counter(avg, case.example)), _params(avg))  # fmt: skip
    return rows


def is_realizable(row: BaselineRow) -> bool:
    """Whether a user could pick this baseline without looking at the evaluation labels: every row except the
    oracle best member and the individual ``member k`` rows (choosing member k because it is best on the test set
    is the oracle)."""
    return not (row.method.startswith("member ") or "oracle" in row.method)


def best_within(rows: Sequence[BaselineRow], max_flops: float, *, realizable_only: bool = True) -> BaselineRow | None:
    """The most accurate (lowest-perplexity) baseline whose FLOPs per sample are at most ``max_flops``.

    Args:
        rows: from :func:`baselines`.
        max_flops: the budget in FLOPs per sample (e.g. ``0.5 * ensemble_flops``).
        realizable_only: consider only :func:`is_realizable` rows (default); False adds the oracle best member.

    Returns:
        The best row, or None when none fits (ties: the cheaper row, then the first).
    """
    fits = [r for r in rows if r.flops <= max_flops and (is_realizable(r) or not realizable_only)]
    if not fits:
        return None
    sign = 1.0 if fits[0].metric == "accuracy" else -1.0
    return max(fits, key=lambda r: (sign * r.value, -r.flops))


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def _fmt(value: float, metric: str) -> str:
    return f"{value:.3f}" if metric == "perplexity" else f"{100 * value:.2f}"


def _summary(case: Case) -> dict[str, Any]:
    rows = {r.method: r for r in baselines(case, combines=(), vanilla=False)}
    o = next(r for name, r in rows.items() if name.startswith("best member (test"))
    return {
        "members": case.member_metrics,
        "best": o.value,
        "ensemble_logits": rows["ensemble (logits)"].value,
        "ensemble_probs": rows["ensemble (probs)"].value,
        "train_time_s": case.train_time_s,
        "threads": sorted({r["threads"] for r in case.records}),
        "flops": rows["member 0"].flops,
        "params": rows["member 0"].params,
    }


def _table(results: list[tuple[Case, dict[str, Any]]]) -> list[str]:
    lines = [
        "| case | metric | members | best member | ensemble (logits) | ensemble (probs) | member FLOPs | "
        "member params | training (s, all members) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, s in results:
        mt = case.metric
        unit = "test ppl" if mt == "perplexity" else "test acc. (%)"
        members = " / ".join(_fmt(v, mt) for v in s["members"])
        lines.append(
            f"| {case.name} | {unit} | {members} | {_fmt(s['best'], mt)} | {_fmt(s['ensemble_logits'], mt)} | "
            f"{_fmt(s['ensemble_probs'], mt)} | {s['flops']:,} | {s['params']:,} | {s['train_time_s']:.0f} |"
        )
    return lines


def _cache_size(root: str) -> tuple[int, int]:
    folder = os.path.join(root, "members")
    if not os.path.isdir(folder):
        return 0, 0
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")]
    return len(files), sum(os.path.getsize(f) for f in files)


def _markdown(results: list[tuple[Case, dict[str, Any]]], root: str) -> str:
    text_info = next((c.data_info for c, _ in results if c.task == "lm"), None)
    n, size = _cache_size(root)
    lines = [
        "# The model zoo (bench/zoo.py)",
        "",
        "Members trained by `bench/zoo.py` on CPU (one torch thread each, `nice -n 10`, on the shared 2-core "
        "development VM while other jobs ran: the training times describe how the members were made, they are "
        "not a timing claim). Test accuracy on the official test sets (digits: stratified 25% split); text: "
        "character-level validation perplexity. 'best member' is the best on the test set (an oracle); the "
        "ensembles average the members' logits or their softmax probabilities with uniform weights. FLOPs per "
        "sample count every matmul / linear / convolution (2 x MACs, attention included; text: per window of "
        "128 tokens). Calibration data: a class-balanced slice held out of the training set (5,000 images on "
        "MNIST / Fashion-MNIST, 200 on digits; 5% of the text blocks).",
        "",
        f"Cache: {n} members, {size / 2**20:.1f} MiB of safetensors (not committed; `python bench/zoo.py build` "
        f"retrains any missing member, deterministically). Zoo version {ZOO_VERSION}, torch {torch.__version__}.",
        "",
    ]
    if text_info:
        lines += [
            f"Text: {text_info['source']}: {', '.join(text_info['files'])} ({text_info['n_chars']:,} characters, "
            f"vocabulary of {text_info['vocab_size']} characters), cut into blocks of {text_info['block_chars']} "
            f"characters: train / calibration / test blocks {text_info['blocks']['train']} / "
            f"{text_info['blocks']['calib']} / {text_info['blocks']['test']} ({text_info['chars']['train']:,} / "
            f"{text_info['chars']['calib']:,} / {text_info['chars']['test']:,} characters); context "
            f"{text_info['context']}, training windows with stride {text_info['context'] // 2}, evaluation windows "
            f"tiled ({text_info['tokens']['calib']:,} calibration and {text_info['tokens']['test']:,} test target "
            "tokens).",
            "",
        ]
    lines += _table(results)
    lines += ["", "## Architectures and training", ""]
    lines += ["| dataset | arch | constructor arguments | training (pyfusion.train.train) |", "|---|---|---|---|"]
    seen: set[tuple[str, str]] = set()
    for case, _ in results:
        d = case.records[0]["definition"]
        if (d["dataset"], d["arch"]) in seen:
            continue
        seen.add((d["dataset"], d["arch"]))
        cfg = ", ".join(f"{k}={v}" for k, v in d["arch_config"].items() if v is not None)
        hp = ", ".join(f"{k}={v}" for k, v in d["train"].items())
        lines.append(f"| {d['dataset']} | {d['arch']} | {cfg} | {hp} |")
    return "\n".join(lines) + "\n"


def _list(pattern: str | None, root: str) -> None:
    for name in case_names(pattern):
        try:
            get_case(name, cache=root, train_missing=False)
            state = "cached"
        except FileNotFoundError:
            state = "missing"
        print(f"{state:8s} {name}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train / list / show the cases of the pyfusion model zoo.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train every selected case into the cache and print a table")
    b.add_argument("--cases", default=None, help="comma-separated globs over the default cases (or case names)")
    b.add_argument("--list", action="store_true", help="only list the selected cases and whether they are cached")
    b.add_argument("--threads", type=int, default=None, help="torch threads per training run (default 1)")
    b.add_argument("--md", default=None, help="also write the table as markdown to this file")
    b.add_argument("--cache", default=None, help="cache folder (default $PYFUSION_ZOO or ~/.cache/pyfusion/zoo)")
    s = sub.add_parser("show", help="describe one case: members, data and every trivial baseline")
    s.add_argument("name")
    s.add_argument("--cache", default=None)
    s.add_argument("--train", action="store_true", help="train the case if it is missing")
    args = ap.parse_args(argv)
    root = args.cache or cache_dir()
    if args.command == "build":
        if args.list:
            _list(args.cases, root)
            return 0
        results = []
        for name in case_names(args.cases):
            print(f"{name}", flush=True)
            case = get_case(name, cache=root, threads=args.threads, verbose=True)
            results.append((case, _summary(case)))
        print("\n".join(_table(results)))
        n, size = _cache_size(root)
        print(f"cache {root}: {n} members, {size / 2**20:.1f} MiB")
        if args.md:
            _atomic_write(args.md, lambda tmp: _write_text(tmp, _markdown(results, root)))
        return 0
    case = get_case(args.name, cache=root, train_missing=args.train)
    print(f"{case.name}: {case.k} members, task {case.task}, data {json.dumps(case.data_info)}")
    for i, r in enumerate(case.records):
        print(f"  member {i}: seed {case.seeds[i]}, init seed {case.init_seeds[i]}, "
              f"{len(case.member_indices[i])} training samples, {r['metric']} {_fmt(r['test'], r['metric'])}, "
              f"trained in {r['train_time_s']:.1f} s ({r['threads']} thread(s)), key {r['key']}")  # fmt: skip
    print("| baseline | m | test | calib | FLOPs/sample | params | FLOPs / ensemble |")
    print("|---|---|---|---|---|---|---|")
    for r in baselines(case):
        cal = "" if r.calib_value is None else _fmt(r.calib_value, r.metric)
        print(f"| {r.method} | {r.m} | {_fmt(r.value, r.metric)} | {cal} | {r.flops:,} | {r.params:,} | "
              f"{r.flops_ratio:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
