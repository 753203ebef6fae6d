"""Method settings: one frozen config dataclass per fusion method (torchao's ``AOBaseConfig`` pattern).

Each registered method has a config class (``PartialConfig`` for ``method="partial"``, ...). A config is checked
when it is made: a bad value raises a ``ValueError`` naming the field, what it must be and what it is, before any
member is touched. What depends on the members, the graph or the data (the reference index against K, alpha
per group name, "needs calibration data") is checked by the method when it runs.

Two equivalent ways to set a method's options::

    pyfusion.fuse(members, data, method="partial", alpha=0.25, features="pcd")   # keyword options
    pyfusion.fuse(members, data, config=PartialConfig(alpha=0.25, features="pcd"))  # a config (method implied)

Keyword options are turned into the method's config (:meth:`MethodConfig.from_options`); an option the config
does not have raises :class:`UnknownOptionError` listing the fields. Options given together with a config
replace those fields (``dataclasses.replace``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pyfusion.match.activations import ACTIVATION_COSTS
from pyfusion.match.importance import IMPORTANCE_METHODS
from pyfusion.match.weights import MASSES, WEIGHT_COSTS

__all__ = [
    "ActivationMatchingConfig",
    "AverageConfig",
    "ClusterConfig",
    "HFConfig",
    "InterpConfig",
    "KFConfig",
    "KFGradientConfig",
    "MethodConfig",
    "OTConfig",
    "PartialConfig",
    "PruneConfig",
    "UnknownOptionError",
    "WeightMatchingConfig",
    "alpha_number",
]


class UnknownOptionError(ValueError, TypeError):
    """An option that the method's config does not have (a ``ValueError``; also a ``TypeError``, what Python raises
    for an unexpected keyword argument, which is what methods raised before they had configs).

    Attributes:
        method: the method name.
        options: the unknown option names.
        fields: the config's field names.
    """

    def __init__(self, message: str, method: str, options: list[str], fields: tuple[str, ...]):
        super().__init__(message)
        self.method, self.options, self.fields = method, options, fields


@dataclass(frozen=True)
class MethodConfig:
    """Base of the method configs: frozen dataclasses whose fields are the method's options."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, method: str, base: MethodConfig | None = None) -> MethodConfig:
        """The config of keyword ``options`` (on top of ``base`` when given).

        Raises:
            UnknownOptionError: an option that is not a field (the message lists the fields).
            ValueError: ``base`` is not a ``cls``, or a field value is invalid.
        """
        fields = cls.field_names()
        unknown = sorted(set(options) - set(fields))
        if unknown:
            if not fields:
                msg = f"method {method!r} takes no options; got {unknown}"
            else:
                names = ", ".join(map(repr, unknown))
                msg = (
                    f"method {method!r} has no option{'s' if len(unknown) > 1 else ''} {names}; "
                    f"its options ({cls.__name__} fields) are: {', '.join(fields)}"
                )
            raise UnknownOptionError(msg, method, unknown, fields)
        if base is None:
            return cls(**options)
        if not isinstance(base, cls):
            raise ValueError(f"config for method {method!r} must be a {cls.__name__}; got {type(base).__name__}")
        return dataclasses.replace(base, **options) if options else base

    def options(self) -> dict[str, Any]:
        """field -> value (shallow)."""
        return {name: getattr(self, name) for name in self.field_names()}

    # -- checks used by the subclasses' __post_init__ ------------------------------------------------------------

    def _fail(self, name: str, expected: str, value: Any) -> None:
        raise ValueError(f"{type(self).__name__}.{name} must be {expected}; got {_show(value)}")

    def _check_choice(self, name: str, allowed: tuple, *, optional: bool = False) -> None:
        value = getattr(self, name)
        if optional and value is None:
            return
        if not isinstance(value, str) or value not in allowed:
            self._fail(name, f"one of {allowed}" + (" or None" if optional else ""), value)

    def _check_int(self, name: str, low: int | None = None, *, optional: bool = False) -> None:
        value = getattr(self, name)
        if optional and value is None:
            return
        if not _is_integer(value) or (low is not None and value < low):
            bound = f" >= {low}" if low is not None else ""
            self._fail(name, f"an integer{bound}" + (" or None" if optional else ""), value)

    def _check_real(self, name: str, low: float, *, above: bool = False, below: float | None = None) -> None:
        value = getattr(self, name)
        ok = _is_real(value) and math.isfinite(float(value))
        ok = ok and (float(value) > low if above else float(value) >= low)
        ok = ok and (below is None or float(value) < below)
        if not ok:
            rng = (f"> {low}" if above else f">= {low}") + (f" and < {below}" if below is not None else "")
            self._fail(name, f"a finite number {rng}", value)


def _show(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (int, float, str, type(None))) else repr(value)


def _is_integer(v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return False
    if isinstance(v, (int, np.integer)):
        return True
    return isinstance(v, (float, np.floating)) and math.isfinite(v) and int(v) == v


def _is_real(v: Any) -> bool:
    return not isinstance(v, (bool, np.bool_)) and isinstance(v, (int, float, np.integer, np.floating))


def alpha_number(v: Any, where: str) -> float:
    """One alpha value as a float in [0, 1] (a 0-d floating tensor is accepted).

    Raises:
        ValueError: ``f"{where} must be ..."`` for a non-number, NaN / inf or a value outside [0, 1].
    """
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        if isinstance(v, Tensor) and v.ndim == 0 and v.dtype.is_floating_point:
            v = float(v)
        else:
            raise ValueError(f"{where} must be a float in [0, 1]; got {type(v).__name__} {v!r}")
    x = float(v)
    if not math.isfinite(x) or not 0.0 <= x <= 1.0:
        raise ValueError(f"{where} must be in [0, 1]; got {x}")
    return x


def _check_alpha(cfg: MethodConfig, name: str = "alpha") -> None:
    """alpha's values (a float, a list / tuple / array / tensor with one per group, or a dict by group name with an
    optional "*" default); the group names and the list length are checked against the graph by the method."""
    alpha = getattr(cfg, name)
    where = f"{type(cfg).__name__}.{name}"
    if isinstance(alpha, Mapping):
        for key, v in alpha.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} (a dict) must have group names as keys; got {type(key).__name__} {key!r}")
            alpha_number(v, f"{where}[{key!r}]")
    elif isinstance(alpha, (list, tuple, np.ndarray)) or (isinstance(alpha, Tensor) and alpha.ndim > 0):
        for i, v in enumerate(list(alpha)):
            alpha_number(v, f"{where}[{i}]")
    else:
        alpha_number(alpha, where)


def _check_width(cfg: MethodConfig) -> None:
    if (cfg.width is None) == (cfg.alpha is None):
        raise ValueError(
            f"{type(cfg).__name__}: give exactly one of width= (int or fraction of one network's width) and alpha=; "
            f"got width={_show(cfg.width)}, alpha={_show(cfg.alpha)}"
        )
    if cfg.alpha is not None:
        _check_alpha(cfg)
        return
    items = cfg.width.items() if isinstance(cfg.width, Mapping) else [(None, cfg.width)]
    expected = "an int >= 1 (slots) or a finite float > 0 (fraction of one member's width)"
    for key, w in items:
        where = "width" if key is None else f"width[{key!r}]"
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, float, np.integer, np.floating)):
            cfg._fail(where, expected, w)
        if isinstance(w, (float, np.floating)) and not (math.isfinite(w) and w > 0):
            cfg._fail(where, expected, w)
        if isinstance(w, (int, np.integer)) and w < 1:
            cfg._fail(where, expected, w)


# ---------------------------------------------------------------------------------------------------------------
# one config per method
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AverageConfig(MethodConfig):
    """``method="average"``: vanilla weight averaging has no options."""


WEIGHT_MATCHING_STARTS = ("identity", "sorted_rows")


@dataclass(frozen=True)
class WeightMatchingConfig(MethodConfig):
    """``method="weight_matching"`` (Git Re-Basin permutation coordinate descent).

    Attributes:
        seed: seed of the random group order.
        max_iter: sweeps per alignment.
        max_rounds: K > 2 only: running-average rounds.
        starts: the descents run for each member's alignment to member 0, each from its own start; the one with
            the highest objective is kept (ties: the earlier start). ``"identity"``: every neuron in its own slot
            (Git Re-Basin's start); ``"sorted_rows"``: each group matched on its weight rows with their entries
            sorted, which other groups' permutations cannot mislead
            (:func:`pyfusion.match.solvers.sorted_rows_start`). Both by default: the identity start alone stopped
            0.25-0.32 off on HF MobileNetV2 and its own permuted copy (two adjacent groups each the other's best
            response); the second descent costs one more alignment.
    """

    seed: int = 0
    max_iter: int = 100
    max_rounds: int = 20
    starts: tuple[str, ...] = ("identity", "sorted_rows")

    def __post_init__(self) -> None:
        self._check_int("seed", 0)
        self._check_int("max_iter", 0)
        self._check_int("max_rounds", 0)
        starts = self.starts
        if (
            not isinstance(starts, (tuple, list))
            or not starts
            or any(not isinstance(x, str) or x not in WEIGHT_MATCHING_STARTS for x in starts)
            or len(set(starts)) != len(starts)
        ):
            self._fail("starts", f"a non-empty tuple of distinct names from {WEIGHT_MATCHING_STARTS}", starts)
        object.__setattr__(self, "starts", tuple(starts))


POINTS = ("post", "pre")


@dataclass(frozen=True)
class ActivationMatchingConfig(MethodConfig):
    """``method="activation_matching"``.

    Attributes:
        cost: "correlation" (1 - Pearson correlation) or "sqdist" (mean squared distance).
        point: "post" (after the activation) or "pre" activation values.
        reference: the member all others are aligned to (checked against K when the method runs).
        max_batches: use at most this many calibration batches.
    """

    cost: str = "correlation"
    point: str = "post"
    reference: int = 0
    max_batches: int | None = None

    def __post_init__(self) -> None:
        self._check_choice("cost", ACTIVATION_COSTS)
        self._check_choice("point", POINTS)
        self._check_int("reference", 0)
        self._check_int("max_batches", 0, optional=True)


OT_COSTS = ("activations", "correlation", "weights")


@dataclass(frozen=True)
class OTConfig(MethodConfig):
    """``method="ot"`` (OT fusion, Singh & Jaggi 2020).

    Attributes:
        cost: "activations" (squared distance; the default when data is given), "correlation" or "weights" (the
            default without data).
        masses: "uniform", "l1", "l2", or group -> K mass vectors (each non-negative, summing to 1).
        point: activation point for the activation costs ("post" or "pre").
        reference: the member whose neurons define the slots.
        max_batches: calibration batches to use.
        reg: None (exact transport, the default) or the entropic regularisation of Sinkhorn (a float > 0, relative
            to each group's largest ground cost; :func:`pyfusion.match.solvers.entropic_transport`): soft maps even
            with uniform masses, approaching the exact plan as reg -> 0.
        max_iter: Sinkhorn iterations at most (reg only; a run that stops before ``tol`` warns).
        tol: Sinkhorn stopping tolerance on the column-marginal violation (reg only).
    """

    cost: str | None = None
    masses: str | Mapping[str, Any] = "uniform"
    point: str = "post"
    reference: int = 0
    max_batches: int | None = None
    reg: float | None = None
    max_iter: int = 10_000
    tol: float = 1e-9

    def __post_init__(self) -> None:
        self._check_choice("cost", OT_COSTS, optional=True)
        if not isinstance(self.masses, Mapping) and (not isinstance(self.masses, str) or self.masses not in MASSES):
            self._fail("masses", "'uniform', 'l1', 'l2' or a dict of mass vectors (group -> K vectors)", self.masses)
        self._check_choice("point", POINTS)
        self._check_int("reference", 0)
        self._check_int("max_batches", 0, optional=True)
        if self.reg is not None and not (_is_real(self.reg) and math.isfinite(float(self.reg)) and self.reg > 0):
            self._fail("reg", "None (exact transport) or a finite number > 0 (Sinkhorn)", self.reg)
        self._check_int("max_iter", 1)
        self._check_real("tol", 0.0, above=True)


PARTIAL_FEATURES = ("weights", "activations", "pcd")


@dataclass(frozen=True)
class PartialConfig(MethodConfig):
    """``method="partial"`` (partial fusion, Morelli & Eckstein 2026).

    Attributes:
        alpha: fraction of each member's neurons left isolated: a float, a list (one per group, graph order) or a
            dict by group name (key "*" for the rest).
        features: "weights", "activations" or "pcd" (None: "activations" when data is given, else "weights").
            Activations measured best: higher test accuracy than weights in 12 of 18 (case, alpha) cells, lower
            distance to the ensemble in 18 of 18 (bench/results/defaults.md).
        cost: "sqdist" (None means this) or "correlation". sqdist measured best: higher test accuracy in 12 of 18
            cells with activations, 15 of 18 with weights (bench/results/defaults.md).
        point: activations only: "pre" (the default) or "post" activation values. point="pre": higher test
            accuracy in 9 of 17 (case, alpha) cells, lower distance to the ensemble in 10 of 18, mean test accuracy
            84.6% vs 82.1% (a ResNet-8 at alpha 0.25: 81.2% vs 44.0%; the largest loss, 1.1 points, on an MLP);
            for partial_fit (which inherits it) higher test accuracy in 12 of 16 cells (bench/results/defaults.md).
        reference: the member every other member is matched to.
        sweeps: pcd only: maximum coordinate-descent sweeps.
        max_batches: activations only: calibration batches used.
    """

    alpha: Any = 0.5
    features: str | None = None
    cost: str | None = None
    point: str = "pre"  # measured: bench/results/defaults.md (the docstring above)
    reference: int = 0
    sweeps: int = 10
    max_batches: int | None = None

    def __post_init__(self) -> None:
        _check_alpha(self)
        self._check_choice("features", PARTIAL_FEATURES, optional=True)
        self._check_choice("cost", WEIGHT_COSTS, optional=True)
        self._check_choice("point", POINTS)
        self._check_int("reference", 0)
        self._check_int("sweeps", 1)
        self._check_int("max_batches", 0, optional=True)


@dataclass(frozen=True)
class ClusterConfig(MethodConfig):
    """``method="cluster"`` (generalized pruning: weighted k-means of the ensemble's neurons).

    Attributes:
        width: slots per group: an int, a float fraction of one member's width, or a dict by group name.
        alpha: alternatively, the partial-fusion level whose slot count to match (exactly one of the two).
        n_restarts: randomized-Ward + k-means restarts per group (200: on 2 x 100 synthetic ReLU neurons with
            2000 samples and k = 120 / 150 / 180, the best inertia of 200 restarts is within 0.01% of the best of
            5000, at 0.2-1.5 s per group on the loaded 2-core VM; 20 restarts are within 0.07%).
        seed: clustering seed (results are identical for any thread count).
        point: "pre" (the default) or "post" activation values. point="pre": higher test accuracy in 10 of 11
            non-tied (case, alpha) cells, lower distance to the ensemble in 14 of 15, mean test accuracy 87.9% vs
            84.4% (bench/results/defaults.md).
        top_k: candidate pairs sampled from at each randomized Ward merge.
        max_batches: calibration batches used.
        num_threads: OpenMP threads of the k-means kernel (None: its default).
    """

    width: Any = None
    alpha: Any = None
    n_restarts: int = 200
    seed: int = 0
    point: str = "pre"  # measured: bench/results/defaults.md (the docstring above)
    top_k: int = 5
    max_batches: int | None = None
    num_threads: int | None = None

    def __post_init__(self) -> None:
        _check_width(self)
        self._check_int("n_restarts", 1)
        self._check_int("seed", 0)
        self._check_choice("point", POINTS)
        self._check_int("top_k", 1)
        self._check_int("max_batches", 0, optional=True)
        self._check_int("num_threads", 1, optional=True)


@dataclass(frozen=True)
class PruneConfig(MethodConfig):
    """``method="prune"`` (structured pruning of the ensemble).

    Attributes:
        width / alpha: the target width, as for :class:`ClusterConfig` (exactly one of the two).
        criterion: "weight_norm" (no data) or "activation_std" (needs data).
        point: activation point of "activation_std".
        max_batches: calibration batches used.
    """

    width: Any = None
    alpha: Any = None
    criterion: str = "weight_norm"
    point: str = "post"
    max_batches: int | None = None

    def __post_init__(self) -> None:
        _check_width(self)
        self._check_choice("criterion", ("weight_norm", "activation_std"))
        self._check_choice("point", POINTS)
        self._check_int("max_batches", 0, optional=True)


STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64, torch.float32: torch.float32,
                torch.float64: torch.float64}  # fmt: skip


@dataclass(frozen=True)
class InterpConfig(MethodConfig):
    """Options of neuron-interpolation fusion (Luenam et al. 2025), shared by :class:`HFConfig`, :class:`KFConfig`
    and :class:`KFGradientConfig` (use those: this base names no method). Every method accepts every field; the
    training fields act in "kf_gradient" only, ``cost`` in "hf" only.

    Attributes:
        importance: "uniform", "activation_gradient" or "conductance" (:mod:`pyfusion.match.importance`).
        n_steps: conductance path steps.
        ridge: relative ridge of the least-squares normal equations.
        stats_dtype: precision of the per-chunk Gram products ("float32" or "float64"); chunks are accumulated
            in float64 either way. float32 roughly halves the fusion time of convolutional levels
            (bench/bench_interp.py); "float64" for bit-level studies.
        cost: HF pair cost, "l2" (the authors' sum of L2 norms) or "sqeuclidean".
        n_restarts, init, seed: k-means restarts, start ("ward": randomized Ward, or "kmeans++") and seed (also
            seeds the training of kf_gradient).
        max_samples: use at most this many calibration samples.
        class_weights: (K, C) per-member class weights for the last-level target of kf_gradient (e.g.
            :func:`pyfusion.data.class_shares`); normalised per class over the members.
        epochs, last_epochs, lr, optimizer, batch_size, patience, val_fraction, weight_decay: kf_gradient training
            (Adam or SGD, an 80/20 split by default, early stopping after ``patience`` epochs without improvement).
        level_init: where kf_gradient starts each level: "member0" (the authors' choice: member 0's weights, the
            k-means of the members' activations aligned to member 0's neurons) or "kf" (the KF closed-form weights
            of Linear/Conv2d levels; a single-layer level is then already the least-squares optimum of its
            targets, so training changes only the head when class weights are given).
    """

    importance: str = "uniform"
    n_steps: int = 10
    ridge: float = 1e-6
    stats_dtype: torch.dtype | str = "float32"
    cost: str = "l2"
    n_restarts: int = 10
    init: str = "ward"
    seed: int = 0
    max_samples: int | None = None
    class_weights: Any = None
    epochs: int = 30
    last_epochs: int = 50
    lr: float = 1e-3
    optimizer: str = "adam"
    batch_size: int = 32
    patience: int = 5
    val_fraction: float = 0.2
    weight_decay: float = 0.0
    level_init: str = "member0"

    def __post_init__(self) -> None:
        self._check_choice("importance", IMPORTANCE_METHODS)
        self._check_int("n_steps", 1)
        self._check_real("ridge", 0.0)
        if not isinstance(self.stats_dtype, (str, torch.dtype)) or self.stats_dtype not in STATS_DTYPES:
            self._fail("stats_dtype", "'float32' or 'float64' (or torch.float32 / torch.float64)", self.stats_dtype)
        self._check_choice("cost", ("l2", "sqeuclidean"))
        self._check_int("n_restarts", 1)
        self._check_choice("init", ("ward", "kmeans++"))
        self._check_int("seed", 0)
        self._check_int("max_samples", 1, optional=True)
        if self.class_weights is not None:
            try:
                cw = torch.as_tensor(self.class_weights, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                cw = None
            if cw is None or cw.ndim != 2 or not bool(torch.isfinite(cw).all()) or bool((cw < 0).any()):
                self._fail("class_weights", "a non-negative finite (K, C) array", self.class_weights)
        self._check_int("epochs", 0)
        self._check_int("last_epochs", 0)
        self._check_real("lr", 0.0)
        self._check_choice("optimizer", ("adam", "sgd"))
        self._check_int("batch_size", 1)
        self._check_int("patience", 0)
        self._check_real("val_fraction", 0.0, below=1.0)
        self._check_real("weight_decay", 0.0)
        self._check_choice("level_init", ("member0", "kf"))

    @property
    def stats_torch_dtype(self) -> torch.dtype:
        """``stats_dtype`` as a torch dtype."""
        return STATS_DTYPES[self.stats_dtype]


@dataclass(frozen=True)
class HFConfig(InterpConfig):
    """``method="hf"``: Hungarian neuron-interpolation fusion of K >= 2 members (K > 2: every member aligned to
    member 0, see :mod:`pyfusion.fuse.interp`; fields: :class:`InterpConfig`)."""


@dataclass(frozen=True)
class KFConfig(InterpConfig):
    """``method="kf"``: k-means neuron-interpolation fusion of K members (fields: :class:`InterpConfig`)."""


@dataclass(frozen=True)
class KFGradientConfig(InterpConfig):
    """``method="kf_gradient"``: the KF grouping, then every level trained (fields: :class:`InterpConfig`)."""
