"""pyfusion.save / pyfusion.load: round trips and the clear errors of bad files."""

from __future__ import annotations

import json
from collections import OrderedDict

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


def test_unregistered_module_writes_nothing_and_keeps_old_file(tmp_path):
    target = tmp_path / "m.safetensors"
    pyfusion.save(_mlp(), target)
    before = target.read_bytes()
    with pytest.raises(SerializationError, match=r"module 'block' of type .*_Custom: it is not an allowed type"):
        pyfusion.save(nn.Sequential(OrderedDict(block=_Custom())), target)
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
