"""pyfusion.save / pyfusion.load: round trips and the clear errors of bad files."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import pyfusion
from pyfusion.serialization import FORMAT, SerializationError, register_module


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
        nn.GELU(approximate="tanh"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(6, 5),
        nn.LayerNorm(5),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.SiLU(), nn.Linear(8, 3, bias=False))


@pytest.mark.parametrize("factory,shape", [(_cnn, (3, 1, 8, 8)), (_mlp, (3, 1, 4, 4))])
def test_round_trip_identical_outputs(tmp_path, factory, shape):
    model = factory()
    with torch.no_grad():  # non-trivial BN running statistics
        model.train()(torch.randn(16, *shape[1:]))
    model.eval()
    model.fusion_layouts = {"0": [3, 1, 0]}
    path = pyfusion.save(model, tmp_path / "m.safetensors")
    loaded = pyfusion.load(path)
    x = torch.randn(*shape)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.fusion_layouts == {"0": [3, 1, 0]}
    assert not loaded.training
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no pyfusion model file"):
        pyfusion.load("/nonexistent/dir/model.safetensors")


def test_truncated_file(tmp_path):
    path = pyfusion.save(_mlp(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 40])
    with pytest.raises(SerializationError, match="truncated"):
        pyfusion.load(tmp_path / "cut.safetensors")
    (tmp_path / "cut2.safetensors").write_bytes(data[:100])
    with pytest.raises(SerializationError, match="truncated"):
        pyfusion.load(tmp_path / "cut2.safetensors")


def test_corrupted_header(tmp_path):
    path = pyfusion.save(_mlp(), tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(SerializationError, match="corrupted"):
        pyfusion.load(tmp_path / "bad.safetensors")


def _rewrite(tmp_path, model, edit):
    path = pyfusion.save(model, tmp_path / "m.safetensors")
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    edit(tensors)
    out = tmp_path / "edited.safetensors"
    save_file(tensors, out, metadata=meta)
    return out


def test_wrong_tensor_shape(tmp_path):
    def edit(t):
        t["1.weight"] = torch.zeros(8, 15)

    with pytest.raises(SerializationError, match=r"tensor '1.weight' has shape \(8, 15\).*expects \(8, 16\)"):
        pyfusion.load(_rewrite(tmp_path, _mlp(), edit))


def test_missing_tensor(tmp_path):
    with pytest.raises(SerializationError, match=r"missing tensor '3.weight'"):
        pyfusion.load(_rewrite(tmp_path, _mlp(), lambda t: t.pop("3.weight")))


def test_unexpected_tensor(tmp_path):
    def edit(t):
        t["extra"] = torch.zeros(1)

    with pytest.raises(SerializationError, match="'extra', which the architecture does not use"):
        pyfusion.load(_rewrite(tmp_path, _mlp(), edit))


def test_plain_safetensors_is_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(SerializationError, match="not a pyfusion model file"):
        pyfusion.load(tmp_path / "plain.safetensors")


def test_unknown_type_in_file_is_refused_without_import(tmp_path):
    model = _mlp()
    path = pyfusion.save(model, tmp_path / "m.safetensors")
    tensors = load_file(path)
    arch = {"type": "os.system", "config": {"command": "echo pwned"}, "children": {}}
    save_file(tensors, tmp_path / "evil.safetensors", metadata={"format": FORMAT, "architecture": json.dumps(arch)})
    with pytest.raises(SerializationError, match="'os.system', which is not an allowed module type"):
        pyfusion.load(tmp_path / "evil.safetensors")


class _Custom(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.width = width
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return self.fc(x) + x


def test_unregistered_class_saves_and_loads_with_its_factory(tmp_path):
    """A class outside the allowlist is saved as member architecture + changes (none here); loading it needs the
    function that builds it, which the error names."""
    model = nn.Sequential(OrderedDict(block=_Custom()))
    path = pyfusion.save(model, tmp_path / "m.safetensors")
    with pytest.raises(SerializationError, match=r"class 'torch.nn.modules.container.Sequential'.*factory="):
        pyfusion.load(path)
    loaded = pyfusion.load(path, factory=lambda: nn.Sequential(OrderedDict(block=_Custom())))
    x = torch.randn(2, 4)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


class _Complex(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, dtype=torch.complex64))


def test_unsaveable_module_writes_nothing_and_keeps_old_file(tmp_path):
    target = tmp_path / "m.safetensors"
    pyfusion.save(_mlp(), target)
    before = target.read_bytes()
    with pytest.raises(SerializationError, match=r"tensor 'block.w' has dtype torch.complex64"):
        pyfusion.save(nn.Sequential(OrderedDict(block=_Complex())), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary left behind


def test_registered_custom_container_with_swapped_child(tmp_path):
    register_module(_Custom, lambda m: {"width": m.width}, lambda cfg: _Custom(**cfg))
    model = _Custom(4)
    model.fc = nn.Linear(4, 4, bias=False)  # a child replaced after construction is restored as saved
    path = pyfusion.save(model, tmp_path / "c.safetensors")
    loaded = pyfusion.load(path)
    assert loaded.fc.bias is None
    x = torch.randn(2, 4)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def _partial_mlp() -> nn.Module:
    from pyfusion.nn import EnsembleLinear, PartialLinear

    return nn.Sequential(
        nn.Flatten(),
        EnsembleLinear(2, 16, 6, shared_input=True, activation="relu"),
        PartialLinear([4, 4, 4], [3, 2, 2], activation="gelu"),
        PartialLinear([3, 2, 2], [5, 0, 0], bias=False),
    )


def _partial_cnn() -> nn.Module:
    from pyfusion.nn import PartialConv2d

    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        PartialConv2d([2, 2, 2], [3, 1, 2], 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def _resnet() -> nn.Module:
    from pyfusion.models import bottleneck_resnet, resnet20

    return nn.Sequential(resnet20(width=1, num_classes=4, in_channels=1, blocks=1), bottleneck_resnet(1, 3, 1, 1))


@pytest.mark.parametrize(
    "factory,shape",
    [(_partial_mlp, (3, 1, 4, 4)), (_partial_cnn, (2, 1, 8, 8)), (lambda: _resnet()[0], (2, 1, 8, 8))],
    ids=["partial_linear+ensemble_linear", "partial_conv2d", "resnet20"],
)
def test_round_trip_pyfusion_modules(tmp_path, factory, shape):
    model = factory()
    with torch.no_grad():
        model.train()(torch.randn(8, *shape[1:]))  # BN statistics
    model.eval()
    loaded = pyfusion.load(pyfusion.save(model, tmp_path / "m.safetensors"))
    x = torch.randn(*shape)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    for a, b in zip(model.modules(), loaded.modules()):
        for attr in ("in_layout", "out_layout", "activation", "stride", "padding"):
            assert getattr(a, attr, None) == getattr(b, attr, None)


def test_bottleneck_resnet_round_trip(tmp_path):
    model = _resnet()[1].eval()
    loaded = pyfusion.load(pyfusion.save(model, tmp_path / "m.safetensors"))
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- hostile files
# Each test below fed a raw exception (KeyError, TypeError, ...), a silent load or a huge allocation through
# pyfusion.load before the header checks (issue 16).
def _split(path) -> tuple[dict, bytes]:
    """(header as a dict, data region) of a safetensors file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict | str, body: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def _forge(tmp_path, edit, model: nn.Module | None = None, keep_checksum: bool = False):
    """Save a model, apply ``edit(header, arch)`` to its parsed header and architecture, write the result."""
    header, body = _split(pyfusion.save(model if model is not None else _mlp(), tmp_path / "m.safetensors"))
    meta = header["__metadata__"]
    if not keep_checksum:
        meta.pop("checksum", None)  # an "old" file: the structural checks alone must catch the forgery
    arch = json.loads(meta["architecture"])
    result = edit(header, arch)
    if result is not None:
        arch = result
    if "architecture" in meta:
        meta["architecture"] = arch if isinstance(arch, str) else json.dumps(arch)
    out = tmp_path / "forged.safetensors"
    out.write_bytes(_join(header, body))
    return out


def _set(path: str, value):
    def edit(header, arch):
        *parents, last = path.split("/")
        node = header if parents[0] == "header" else arch
        for p in parents[1:]:
            node = node[p]
        node[last] = value

    return edit


def _deep(depth: int) -> str:
    """A Sequential nested ``depth`` levels deep, as JSON text (json.dumps itself recurses too deeply)."""
    head = '{"type": "torch.nn.Sequential", "config": {}, "children": {"0": '
    return head * depth + '{"type": "torch.nn.Identity", "config": {}, "children": {}}' + "}}" * depth


FORGERIES = {
    # tensor entries of the safetensors header
    "entry without data_offsets": lambda h, a: h["1.weight"].pop("data_offsets"),
    "entry is a list": _set("header/1.weight", [1, 2]),
    "unknown dtype": _set("header/1.weight/dtype", "F33"),
    "dtype of another size": _set("header/1.weight/dtype", "F64"),
    "shape of strings": _set("header/1.weight/shape", ["8", "16"]),
    "negative shape": _set("header/1.weight/shape", [-8, -16]),
    "offsets of floats": _set("header/1.weight/data_offsets", [0.0, 512.0]),
    "overlapping offsets": _set("header/3.weight/data_offsets", [0, 96]),
    "metadata not strings": _set("header/__metadata__/attributes", {"a": 1}),
    "header is a list": lambda h, a: h.clear() or None,
    # the architecture record
    "type is a list": _set("arch/type", ["torch.nn.Sequential"]),
    "type is a number": _set("arch/children/1/type", 7),
    "children is a list": _set("arch/children", [1, 2]),
    "config is a list": _set("arch/children/1/config", [16, 8]),
    "node is a string": _set("arch/children/1", "torch.nn.Linear"),
    "child name with a dot": lambda h, a: {**a, "children": {"a.b": a["children"]["1"]}},
    "child name empty": lambda h, a: {**a, "children": {"": a["children"]["1"]}},
    "child name shadows an attribute": lambda h, a: {**a, "children": {"training": a["children"]["1"]}},
    "unknown node field": _set("arch/children/1/code", "import os"),
    "config device meta": _set("arch/children/1/config/device", "meta"),
    "config device cpu": _set("arch/children/1/config/device", "cpu"),
    "config dtype": _set("arch/children/1/config/dtype", "float64"),
    "config bias is a string": _set("arch/children/1/config/bias", "yes"),
    "config width is a string": _set("arch/children/1/config/in_features", "16"),
    "config width negative": _set("arch/children/1/config/in_features", -16),
    "config unknown key": _set("arch/children/2/config/threshold", 0.5),
    "architecture 3000 deep": lambda h, a: _deep(3000),
    "architecture 200 deep": lambda h, a: _deep(200),
    "architecture not JSON": lambda h, a: "{not json",
    "architecture missing": lambda h, a: h["__metadata__"].pop("architecture"),
    "attributes is a list": _set("header/__metadata__/attributes", "[1, 2]"),
    "attributes of lists": _set("header/__metadata__/attributes", '{"": [1]}'),
    "attributes 3000 deep": _set("header/__metadata__/attributes", "[" * 3000 + "]" * 3000),
    "unknown metadata record": _set("header/__metadata__/checksumm", "sha256:00"),
    "module list out of order": lambda h, a: {
        "type": "torch.nn.ModuleList",
        "config": {},
        "children": {"1": a["children"]["1"], "0": a["children"]["3"]},
    },
}


@pytest.mark.filterwarnings("ignore:.*has no checksum")
@pytest.mark.parametrize("name", list(FORGERIES))
def test_forged_header_is_a_serialization_error(tmp_path, name):
    path = _forge(tmp_path, FORGERIES[name])
    with pytest.raises(SerializationError, match="forged.safetensors"):
        pyfusion.load(path)


def test_architecture_limits(tmp_path):
    from pyfusion.serialization import MAX_DEPTH, MAX_NODES

    with pytest.raises(SerializationError, match=f"deeper than {MAX_DEPTH} levels"):
        pyfusion.load(_forge(tmp_path, lambda h, a: _deep(MAX_DEPTH + 1), keep_checksum=True))
    wide = {"type": "torch.nn.Sequential", "config": {}, "children": {}}
    wide["children"] = {str(i): {"type": "torch.nn.Identity"} for i in range(MAX_NODES + 1)}
    with pytest.raises(SerializationError, match=f"more than {MAX_NODES} modules"):
        pyfusion.load(_forge(tmp_path, lambda h, a: wide, keep_checksum=True))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # a flipped width of 0
def test_every_bit_flip_is_a_serialization_error(tmp_path):
    """Flip single bits all over a file (header, records, checksum, tensor data): every one is refused, typed."""
    path = pyfusion.save(_mlp(), tmp_path / "m.safetensors")
    data = path.read_bytes()
    flipped = tmp_path / "flipped.safetensors"
    bits = range(0, 8 * len(data), 5)  # every 5th bit: ~2500 files, every byte hit at least once
    for i in bits:
        b = bytearray(data)
        b[i // 8] ^= 1 << (i % 8)
        flipped.write_bytes(bytes(b))
        try:
            pyfusion.load(flipped)
        except SerializationError:
            continue
        raise AssertionError(f"flipping bit {i % 8} of byte {i // 8} loaded without an error")


def test_forged_huge_layer_is_refused_before_allocation(tmp_path):
    """A tiny file declaring a 30000 x 30000 Linear (3.6 GB) is refused in well under a second, with no big
    allocation (peak RSS of a fresh process)."""
    import subprocess
    import sys

    def edit(header, arch):
        arch["children"]["1"]["config"]["in_features"] = 30000
        arch["children"]["1"]["config"]["out_features"] = 30000

    path = _forge(tmp_path, edit)
    fine = pyfusion.save(_mlp(), tmp_path / "fine.safetensors")
    script = (
        "import resource, sys, time, torch, pyfusion\n"
        "from pyfusion.serialization import SerializationError\n"
        "pyfusion.load(sys.argv[2])  # warm: imports and the registry\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t0 = time.perf_counter()\n"
        "try:\n"
        "    pyfusion.load(sys.argv[1])\n"
        "except SerializationError as exc:\n"
        "    msg = str(exc)\n"
        "print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, msg)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", script, str(path), str(fine)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    seconds, rss_kb, msg = proc.stdout.split(" ", 2)
    assert "1.weight" in msg and "(30000, 30000)" in msg
    assert float(seconds) < 1.0 and int(rss_kb) < 100_000  # KB on Linux: < 100 MB


def test_checksum_detects_data_bit_flips_and_can_be_skipped(tmp_path):
    model = _mlp()
    path = pyfusion.save(model, tmp_path / "m.safetensors")
    assert pyfusion.load(path).fusion_checksum == "verified"
    header, body = _split(path)
    assert header["__metadata__"]["checksum"].startswith("sha256:")
    b = bytearray(body)
    b[100] ^= 0x04  # one bit of one weight: before checksums this loaded silently with different outputs
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(_join(header, bytes(b)))
    with pytest.raises(SerializationError, match="checksum does not match"):
        pyfusion.load(bad)
    skipped = pyfusion.load(bad, verify=False)  # the opt-out: no check, reported as such
    assert skipped.fusion_checksum == "skipped"
    assert not torch.equal(skipped[1].weight, model[1].weight)


def test_config_edits_are_covered_by_the_checksum(tmp_path):
    """A changed hyper-parameter that keeps every shape (here LayerNorm's eps) is caught by the checksum."""
    edit = _set("arch/children/10/config/eps", 0.5)
    with pytest.raises(SerializationError, match="checksum does not match"):
        pyfusion.load(_forge(tmp_path, edit, model=_cnn(), keep_checksum=True))


def test_file_without_checksum_loads_and_says_so(tmp_path):
    model = _mlp()
    header, body = _split(pyfusion.save(model, tmp_path / "m.safetensors"))
    del header["__metadata__"]["checksum"]  # what pyfusion wrote before checksums
    old = tmp_path / "old.safetensors"
    old.write_bytes(_join(header, body))
    from pyfusion.serialization import UnverifiedFileWarning

    with pytest.warns(UnverifiedFileWarning, match="no checksum"):
        loaded = pyfusion.load(old)
    assert loaded.fusion_checksum == "absent"
    x = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_dtypes_survive_the_round_trip(tmp_path):
    """A float64 model loads as float64 (it used to be copied into a float32 rebuild)."""
    model = _mlp().double()
    loaded = pyfusion.load(pyfusion.save(model, tmp_path / "m.safetensors"))
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_wrong_dtype_kind_is_refused(tmp_path):
    from safetensors import safe_open

    path = pyfusion.save(_mlp(), tmp_path / "m.safetensors")
    tensors = load_file(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors["1.weight"] = torch.zeros(8, 16, dtype=torch.int32)
    save_file(tensors, tmp_path / "int.safetensors", metadata=meta)
    with pytest.raises(SerializationError, match=r"'1.weight' is I32 in the file.*floating-point"):
        pyfusion.load(tmp_path / "int.safetensors")


# --------------------------------------------------------------------------------------------- atomic save
def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failed_check_keeps_the_old_file(tmp_path):
    target = tmp_path / "m.safetensors"
    pyfusion.save(_mlp(), target)
    before = target.read_bytes()
    seen = []

    def check(reloaded: nn.Module) -> None:
        seen.append(type(reloaded))
        raise ValueError("outputs differ")

    with pytest.raises(ValueError, match="outputs differ"):
        pyfusion.save(_cnn(), target, check=check)
    assert seen == [nn.Sequential]  # the check saw the reloaded temporary file
    assert target.read_bytes() == before and _listing(tmp_path) == ["m.safetensors"]


def test_corrupted_write_is_caught_before_replacing(tmp_path, monkeypatch):
    """The disk returns other bytes than were written: verification fails, the old file stays, no temporary."""
    target = tmp_path / "m.safetensors"
    pyfusion.save(_mlp(), target)
    before = target.read_bytes()
    real_fdopen = os.fdopen

    class Flipping:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            b = bytearray(data)
            b[-3] ^= 0x10  # a bit of the last tensor
            return self.f.write(bytes(b))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Flipping(real_fdopen(fd, mode)))
    with pytest.raises(SerializationError, match="checksum does not match"):
        pyfusion.save(_mlp(), target)
    assert target.read_bytes() == before and _listing(tmp_path) == ["m.safetensors"]


def test_fsync_error_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    pyfusion.save(_mlp(), target)
    before = target.read_bytes()

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        pyfusion.save(_cnn(), target)
    assert target.read_bytes() == before and _listing(tmp_path) == ["m.safetensors"]


def test_sigterm_during_fsync_removes_the_temporary(tmp_path):
    """A process killed (SIGTERM) while its save blocks in fsync dies as SIGTERM says, leaving the old file and
    no ``.m.safetensors.*.tmp``."""
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "m.safetensors"
    pyfusion.save(_mlp(), target)
    before = target.read_bytes()
    ready = tmp_path / "in_fsync"
    script = (
        "import os, sys, time, torch, pyfusion\n"
        "def blocking_fsync(fd):\n"
        "    open(sys.argv[2], 'w').close()\n"
        "    time.sleep(60)\n"
        "os.fsync = blocking_fsync\n"
        "pyfusion.save(torch.nn.Sequential(torch.nn.Linear(4, 4)), sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", script, str(target), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the save never reached fsync"
            time.sleep(0.05)
        assert any(n.endswith(".tmp") for n in _listing(tmp_path))  # mid-save: the temporary exists
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert target.read_bytes() == before
    assert _listing(tmp_path) == ["in_fsync", "m.safetensors"]


class _NeedsValues(nn.Module):
    """A user class whose constructor reads a tensor value (impossible on the meta device)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.scale = float(torch.ones(1).sum().item())

    def forward(self, x):
        return self.fc(x) * self.scale


def test_user_class_that_cannot_be_built_on_meta_loads(tmp_path):
    register_module(_NeedsValues, lambda m: {"width": m.fc.in_features}, lambda cfg: _NeedsValues(**cfg))
    model = nn.Sequential(_NeedsValues(4), nn.ReLU())
    loaded = pyfusion.load(pyfusion.save(model, tmp_path / "u.safetensors"))
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not any(t.is_meta for t in loaded.state_dict().values())
