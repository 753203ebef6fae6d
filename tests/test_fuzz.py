"""Property-based fuzzing (hypothesis) of what users and files hand to pyfusion (issue 16).

* Saved files: bit flips anywhere, mutated header / architecture / attribute JSON (wrong types, deleted and
  added keys, deep nesting), with and without a checksum. ``pyfusion.load`` either loads a module or raises
  ``SerializationError``; nothing else escapes.
* ``pyfusion.fuse`` arguments: lambdas, alpha, calibration data (shapes, dtypes, types) and options. It either
  fuses or raises a ``ValueError`` (or a subclass); the members' state dicts and training flags never change.

Bounded for CI: a fixed number of examples per test (``max_examples``), no per-example deadline (the shared
CI machine is noisy), derandomized so that a failure reproduces.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pyfusion
from pyfusion import models
from pyfusion.serialization import SerializationError


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --------------------------------------------------------------------------------------------- saved files
def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    m.fusion_info = {"method": "average", "alpha": [0.5, 0.25]}
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[bytes, object]:
    folder = tmp_path_factory.mktemp("fuzz_files")
    data = pyfusion.save(_model(), folder / "m.safetensors").read_bytes()
    return data, folder


def _load_or_serialization_error(path) -> nn.Module | None:
    """Load ``path``; a SerializationError is fine (returns None); any other exception fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unverified (checksum-less) files, zero-element inits of forged widths
            module = pyfusion.load(path)
    except SerializationError:
        return None
    assert isinstance(module, nn.Module)
    return module


@fuzz(150)
@given(bits=st.lists(st.integers(min_value=0), min_size=1, max_size=6, unique=True))
def test_bit_flips_are_always_refused(saved, bits):
    data, folder = saved
    b = bytearray(data)
    flips = sorted({i % (8 * len(b)) for i in bits})
    for i in flips:
        b[i // 8] ^= 1 << (i % 8)
    if bytes(b) == data:
        return
    path = folder / "flipped.safetensors"
    path.write_bytes(bytes(b))
    assert _load_or_serialization_error(path) is None, f"flipped bits {flips} loaded"


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["torch.nn.Linear", "torch.nn.Sequential", "F32", "meta", "cuda", "..", "a.b", "", "0"]),
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def _paths(node, prefix=()):
    """Every path (tuple of keys / indices) into a JSON value."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _deep(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def _rechecksum(header: dict, body: bytes) -> None:
    """Recompute the checksum of a mutated header (a forger's file: only the structural checks can catch it)."""
    from pyfusion._member_files import RECORDS
    from pyfusion.serialization import _digest

    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(meta.get(r), str) for r in RECORDS):
        return
    try:
        tensors = [
            (k, e["dtype"], tuple(e["shape"]), body[e["data_offsets"][0] : e["data_offsets"][1]])
            for k, e in header.items()
            if k != "__metadata__"
        ]
        meta["checksum"] = _digest([meta[r] for r in RECORDS], tensors)
    except Exception:  # noqa: BLE001 - a mutated entry: the file stays as it is
        return


@st.composite
def mutated_files(draw, data: bytes, recompute: bool = False):
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    meta = header["__metadata__"]
    # the JSON records: architecture + attributes (pyfusion.module/1), base + changes + ties + attributes (/2)
    names = [r for r in ("architecture", "base", "changes", "ties", "attributes") if r in meta]
    records = {r: json.loads(meta[r]) for r in names}
    keep_checksum = draw(st.booleans())
    if not keep_checksum:
        meta.pop("checksum", None)
    # which document to mutate: the header itself or one of the records
    target = draw(st.sampled_from(["header", *names]))
    doc = header if target == "header" else records[target]
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "insert", "deep"]))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if not path:  # the document itself
            if action in ("replace", "deep"):
                doc = draw(JSON) if action == "replace" else json.loads(_deep(draw(st.integers(1, 400))))
            continue
        key = path[-1]
        if action == "replace":
            parent[key] = draw(JSON)
        elif action == "deep":
            parent[key] = json.loads(_deep(draw(st.integers(1, 400))))
        elif action == "delete":
            del parent[key]
        elif isinstance(parent[key], dict):
            parent[key][draw(st.text(max_size=8))] = draw(JSON)
        elif isinstance(parent[key], list):
            parent[key].append(draw(JSON))
    if target == "header":
        header = doc
    else:
        records[target] = doc
    if isinstance(header, dict) and isinstance(header.get("__metadata__"), dict):
        m = header["__metadata__"]
        for name in names:
            if name in m:
                m[name] = json.dumps(records[name]) if target == name else m[name]
        # very deep records as raw text (json.dumps itself refuses them)
        if target != "header" and draw(st.booleans()) and draw(st.booleans()):
            m[target] = _deep(draw(st.integers(900, 5000)), json.dumps(records[target]))
    if recompute and keep_checksum and isinstance(header, dict) and draw(st.booleans()):
        _rechecksum(header, body)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


@fuzz(150)
@given(st.data())
def test_mutated_headers_load_or_raise_serialization_error(saved, data):
    original, folder = saved
    forged = data.draw(mutated_files(original))
    path = folder / "mutated.safetensors"
    path.write_bytes(forged)
    module = _load_or_serialization_error(path)
    if module is not None and getattr(module, "fusion_checksum", None) == "verified":
        # a verified load is the saved model exactly
        ref = _model()
        x = torch.randn(4, 1, 8)
        with torch.no_grad():
            torch.testing.assert_close(module(x), ref.eval()(x), rtol=0, atol=0)


# ------------------------------------------------------------------------ files of user classes / Hugging Face
def _member_fused(kind: str):
    """(fused model, factory, input): a partially fused user transformer (nn.MultiheadAttention resized in place,
    MemberViewNorm, PartialLinear) or Hugging Face GPT-2 (Conv1D resized, tied embeddings untied)."""
    from _ir_families import partial_plan, permuted_twin, randomize
    from _ir_models import MHANet, hf_models

    from pyfusion.fuse.builder import build
    from pyfusion.fuse.fast import swap_partial_modules
    from pyfusion.graph import trace_groups

    if kind == "user":
        factory, x = MHANet, (torch.randn(2, 5, 5, dtype=torch.float64),)
    else:
        hf = hf_models()
        if not hf:
            pytest.skip("transformers is not installed")
        factory, x = hf["gpt2"]
    a = randomize(factory(), 1)
    graph = trace_groups(a, x)
    twin, perms = permuted_twin(a, graph)
    fused = build([a, twin], graph, partial_plan(graph, perms))
    swap_partial_modules(fused, 2)
    return fused.eval(), (factory if kind == "user" else None), x


@pytest.fixture(scope="module", params=["user", "hf"])
def saved_member(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"fuzz_{request.param}")
    fused, factory, x = _member_fused(request.param)
    data = pyfusion.save(fused, folder / "m.safetensors").read_bytes()
    with torch.no_grad():
        want = fused(*x)
    return data, folder, factory, x, want


def _load_member_or_error(path, factory) -> nn.Module | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = pyfusion.load(path, factory=factory)
    except SerializationError:
        return None
    assert isinstance(module, nn.Module)
    return module


def _outputs(y):
    return [y] if isinstance(y, torch.Tensor) else [t for t in y.to_tuple() if isinstance(t, torch.Tensor)]


@fuzz(60)
@given(bits=st.lists(st.integers(min_value=0), min_size=1, max_size=6, unique=True))
def test_member_file_bit_flips_are_always_refused(saved_member, bits):
    data, folder, factory, _, _ = saved_member
    b = bytearray(data)
    for i in sorted({i % (8 * len(b)) for i in bits}):
        b[i // 8] ^= 1 << (i % 8)
    if bytes(b) == data:
        return
    path = folder / "flipped.safetensors"
    path.write_bytes(bytes(b))
    assert _load_member_or_error(path, factory) is None, "flipped bits loaded"


@fuzz(80)
@given(st.data())
def test_member_file_mutated_records_load_or_raise_serialization_error(saved_member, data):
    """Mutations of the base (member description, Hugging Face config), changes and ties records, some with their
    checksum recomputed (a forger's file: only the structural checks stand): a typed error or a module."""
    original, folder, factory, _, _ = saved_member
    path = folder / "mutated.safetensors"
    path.write_bytes(data.draw(mutated_files(original, recompute=True)))
    _load_member_or_error(path, factory)  # a module or a SerializationError; anything else fails the test


# --------------------------------------------------------------------------------------------- fuse arguments
@pytest.fixture(scope="module")
def members() -> list[nn.Module]:
    torch.manual_seed(1)
    ms = [models.mlp([16, 8, 8, 4]) for _ in range(2)]
    ms[0].train()
    ms[1].eval()
    return ms


FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    FLOATS,
    st.text(max_size=4),
    st.lists(FLOATS, max_size=4),
    st.dictionaries(st.text(max_size=4), FLOATS, max_size=3),
)
LAMBDAS = st.one_of(
    st.none(),
    st.just([0.25, 0.75]),
    st.text(max_size=4),
    st.lists(st.one_of(FLOATS, st.text(max_size=2), st.none()), max_size=4),
    st.lists(st.integers(0, 3), min_size=1, max_size=3).map(lambda s: torch.rand(*s)),
    ANY,
)
ALPHA = st.one_of(
    st.floats(0, 1),
    FLOATS,
    st.lists(FLOATS, max_size=4),
    st.dictionaries(st.sampled_from(["g0:1", "g1:3", "*", "nope", ""]), st.one_of(FLOATS, st.text(max_size=2))),
    st.text(max_size=4),
    st.none(),
)
SHAPES = st.one_of(
    st.just((6, 1, 4, 4)),
    st.just((6, 16)),
    st.lists(st.integers(0, 6), min_size=0, max_size=4).map(tuple),
)
DTYPES = st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool, torch.float16])


@st.composite
def calibration(draw):
    """Valid calibration data about half of the time (so that fusions also run to the end), else anything."""
    if draw(st.booleans()):
        x = torch.rand(6, 1, 4, 4)
        return draw(st.sampled_from([[x], [(x, torch.zeros(6, dtype=torch.long))], None]))
    kind = draw(st.sampled_from(["tensor_list", "pairs", "bare", "strings", "empty", "other"]))
    if kind in ("strings", "other"):
        return draw(st.one_of(st.lists(st.text(max_size=3), max_size=3), ANY, st.just([[]]), st.just([()])))
    if kind == "empty":
        return []
    x = torch.rand(draw(SHAPES)).to(draw(DTYPES))
    shape = tuple(x.shape)
    if kind == "bare":
        return x
    if kind == "pairs":
        return [(x, torch.zeros(shape[0] if shape else 0, dtype=torch.long))]
    return [x]


def _sometimes(draw, valid, anything):
    return draw(valid) if draw(st.booleans()) else draw(anything)


@st.composite
def fuse_calls(draw):
    method = draw(st.sampled_from(["average", "partial", "weight_matching", "activation_matching", "ot", "prune"]))
    kwargs = {"method": method}
    if draw(st.booleans()):
        kwargs["lambdas"] = _sometimes(
            draw, st.sampled_from([[0.5, 0.5], (0.2, 0.8), torch.tensor([1.0, 0.0])]), LAMBDAS
        )
    if method in ("partial", "prune") and draw(st.booleans()):
        kwargs["alpha"] = _sometimes(draw, st.floats(0, 1), ALPHA)
    if method == "prune" and "alpha" not in kwargs:
        kwargs["width"] = draw(st.one_of(st.floats(0.1, 1.0), st.integers(1, 8)))
    if draw(st.integers(0, 3)) == 0:  # unknown options
        kwargs[draw(st.sampled_from(["iterations", "no_such", "alphas", "lambda"]))] = draw(ANY)
    return draw(calibration()), kwargs


def _state(ms: list[nn.Module]):
    return [({k: v.clone() for k, v in m.state_dict().items()}, [x.training for x in m.modules()]) for m in ms]


@fuzz(100)
@given(call=fuse_calls())
def test_fuse_arguments_give_value_errors_and_leave_members_unchanged(members, call):
    data, kwargs = call
    before = _state(members)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = pyfusion.fuse(members, data, **kwargs)
    except ValueError:
        pass
    else:
        assert isinstance(fused, nn.Module)
        lam = kwargs.get("lambdas")
        assert lam is None or math.isclose(sum(float(v) for v in list(lam)), 1.0, abs_tol=1e-6)
    for (sd, flags), m in zip(before, members):
        after = m.state_dict()
        assert all(torch.equal(sd[k], after[k]) for k in sd), "a member's tensors changed"
        assert flags == [x.training for x in m.modules()], "a member's training flags changed"
