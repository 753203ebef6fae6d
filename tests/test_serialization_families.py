"""Save / load of fused models of every IR family, loaded in a fresh process without pickle (issue 12 item 8, issue 16).

For every family of tests/_save_families.py (MLP, VGG + BatchNorm, ResNet, user classes with ``torch.cat`` skips and
in-place ReLU, channels-last flatten, ``nn.MultiheadAttention``, ``nn.TransformerEncoder``, hand-written attention,
SwiGLU + RMSNorm, Hugging Face BERT, ViT, GPT-2, Llama-GQA), two independently drawn float64 members are fused by
``average`` and by ``partial`` at alpha 0.5, with ``fast_modules`` True and False, and saved. One fresh Python process
(pickle disabled in it: an audit hook on ``pickle.find_class`` and ``torch.load`` replaced) loads every file: the
user classes with ``factory=``, the Hugging Face models from their saved config, pyfusion's models from their module
tree. Its outputs on fresh inputs equal the fused model's to float64 precision, every tensor is bit for bit the
same, the module classes and fusion layouts come back. The files are plain safetensors with JSON records. Truncated
and tampered files, a missing or wrong factory and a forged config are each a :class:`SerializationError` that
names the problem; a failed save leaves the previous file and no temporary behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ir_families import randomize, run
from _ir_models import register_test_adapters
from _save_families import FAMILIES, module_classes, tensor_digest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pyfusion
from pyfusion import _member_files as mf
from pyfusion.graph import trace_groups
from pyfusion.serialization import FORMAT, FORMAT_MEMBER, SerializationError, _digest

# one module fixture fuses 13 families four ways and starts one Python process: about 75 s on a loaded 2-core machine
pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
METHODS = {"average": {}, "partial": {"alpha": 0.5}}
# Hugging Face ViT partially fused with fast_modules=True does not run (its embeddings read
# patch_embeddings.projection.weight, which the PartialConv2d that pyfusion.fuse.fast swaps in does not have): a limit
# of the fast-module swap, not of the file; its dense twin (fast_modules=False) is tested
NOT_RUNNABLE = {("vit", "partial", True)}
CASES = [(f, m, fast) for f in FAMILIES for m in METHODS for fast in (False, True) if (f, m, fast) not in NOT_RUNNABLE]
USER = [f for f, (_, _, kind) in FAMILIES.items() if kind == "user"]
HF = [f for f, (_, _, kind) in FAMILIES.items() if kind == "huggingface"]
# HF config keys of the residual width, per family (a forged config changes it)
WIDTH_KEY = {"bert": "hidden_size", "vit": "hidden_size", "gpt2": "n_embd", "llama": "hidden_size"}


def _id(family: str, method: str, fast: bool) -> str:
    return f"{family}-{method}-{'fast' if fast else 'dense'}"


def _partial_id(family: str) -> str:
    """The partially fused case of a family (with fast modules where they run)."""
    return _id(family, "partial", (family, "partial", True) not in NOT_RUNNABLE)


def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    return n


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case fused, saved and loaded in one fresh process: (folder, {id: expectations}, {id: report})."""
    threads = _one_thread()
    register_test_adapters()
    folder = tmp_path_factory.mktemp("families")
    expected, manifest = {}, []
    try:
        for family, (factory, batch, _) in FAMILIES.items():
            gen = torch.Generator().manual_seed(11)
            a, b = randomize(factory(), 1), randomize(factory(), 2)
            data = [batch(gen) for _ in range(2)]
            x = batch(torch.Generator().manual_seed(99))  # fresh inputs, not the calibration data
            graph = trace_groups(a, data[0])
            save_file({"x": x}, folder / f"{family}.inputs.safetensors")
            for method, opts in METHODS.items():
                for fast in (False, True):
                    if (family, method, fast) in NOT_RUNNABLE:
                        continue
                    cid = _id(family, method, fast)
                    fused = pyfusion.fuse(
                        [a, b], data, method=method, graph=graph, reset_bn=False, fast_modules=fast, **opts
                    ).eval()
                    path = pyfusion.save(fused, folder / f"{cid}.safetensors")
                    expected[cid] = {
                        "outputs": run(fused, (x,)),
                        "classes": module_classes(fused),
                        "digest": tensor_digest(fused),
                        "layouts": {k: list(v) for k, v in fused.fusion_layouts.items()},
                        "model": fused,
                    }
                    manifest.append(
                        {
                            "id": cid,
                            "family": family,
                            "file": str(path),
                            "inputs": str(folder / f"{family}.inputs.safetensors"),
                            "outputs": str(folder / f"{cid}.outputs.safetensors"),
                        }
                    )
    finally:
        torch.set_num_threads(threads)
    (folder / "manifest.json").write_text(json.dumps({"cases": manifest, "report": str(folder / "report.json")}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(HERE / "_save_families.py"), str(folder / "manifest.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folder, expected, json.loads((folder / "report.json").read_text())


@pytest.mark.parametrize("family,method,fast", CASES, ids=[_id(*c) for c in CASES])
def test_fused_model_loads_in_a_fresh_process_without_pickle(saved, family, method, fast):
    folder, expected, report = saved
    cid = _id(family, method, fast)
    got, want = report[cid], expected[cid]
    assert "error" not in got, got.get("error")
    assert got["pickle_events"] == []  # nothing tried to unpickle, not even inside a caught exception
    assert got["classes"] == want["classes"]  # same module tree, pyfusion's fast modules included
    assert got["digest"] == want["digest"]  # every tensor bit for bit (non-persistent buffers too)
    assert got["checksum"] == "verified" and got["training"] is False
    assert got["layouts"] == want["layouts"]
    outs = load_file(folder / f"{cid}.outputs.safetensors")
    ys = [outs[f"y{i}"] for i in range(len(outs))]
    assert len(ys) == len(want["outputs"])
    for y, w in zip(ys, want["outputs"]):
        assert y.dtype == w.dtype and y.shape == w.shape
        if w.is_floating_point():
            assert w.dtype == torch.float64
            scale = max(1.0, float(w.abs().max()))
            assert float((y - w).abs().max()) <= 1e-12 * scale
        else:
            assert torch.equal(y, w)


def test_fast_modules_are_saved_as_pyfusion_modules(saved):
    """The fast-module files hold pyfusion's execution modules (PartialLinear, PartialConv2d...), rebuilt as such: the
    classes compared above include them. Which layers pyfusion.fuse.fast swaps is its own decision; here several
    families must have some, so that the files of fast modules are really exercised."""
    _, expected, report = saved
    swapped = [
        cid
        for cid in expected
        if cid.endswith("-partial-fast") and any(c.startswith("pyfusion.nn.") for _, c in expected[cid]["classes"])
    ]
    assert len(swapped) >= 3, swapped
    for cid in swapped:
        assert report[cid]["classes"] == expected[cid]["classes"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_file_is_safetensors_with_json_records(saved, family):
    folder, expected, _ = saved
    cid = _partial_id(family)
    path = folder / f"{cid}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    kind = FAMILIES[family][2]
    assert meta["format"] == (FORMAT if kind == "pyfusion" else FORMAT_MEMBER)
    assert meta["checksum"].startswith("sha256:")
    for record, text in meta.items():
        if record not in ("format", "checksum"):
            json.loads(text)  # every record is JSON
    if kind != "pyfusion":
        base = json.loads(meta["base"])
        assert base["kind"] == kind
        # the member architecture, module by module (classes, tensor shapes, plain attributes), and its ties: the
        # factory's model, or the Hugging Face model of the fused config (which says whether fusion untied the
        # embeddings: partial fusion of GPT-2 does)
        fused = expected[cid]["model"]
        member = FAMILIES[family][0]() if kind == "user" else type(fused)(fused.config)
        assert base["modules"] == mf.describe_modules(member)
        assert base["ties"] == [g for g in mf.tie_groups(mf.named_tensors(member)) if len(g) > 1]
        if kind == "huggingface":
            assert base["config"]["model_type"] == expected[cid]["model"].config.model_type
    tensors = load_file(path)  # plain safetensors: readable without pyfusion
    assert set(tensors) == names
    state = expected[cid]["model"].state_dict()
    aliases = {k for g in json.loads(meta.get("ties", "[]")) for k in g[1:]}
    for k, t in tensors.items():
        if k in state:
            assert torch.equal(t, state[k]), k
    assert set(state) - aliases <= set(tensors)


# --------------------------------------------------------------------------------------------- damaged files
def _load(path, family, **kw):
    factory = FAMILIES[family][0] if FAMILIES[family][2] == "user" else None
    return pyfusion.load(path, factory=kw.pop("factory", factory), **kw)


def _header_len(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_truncated_and_tampered_files_are_named_errors(saved, family, tmp_path):
    folder, _, _ = saved
    data = (folder / f"{_partial_id(family)}.safetensors").read_bytes()
    n = _header_len(data)
    bad = tmp_path / "bad.safetensors"
    damaged = {
        "truncated tensor data": (data[:-5], r"is truncated: the tensors need \d+ bytes of data but the file has \d+"),
        "truncated header": (data[: 8 + n // 2], r"is truncated: its header claims \d+ bytes"),
        "a few bytes": (data[:5], r"is only 5 bytes long"),
        "tensor byte changed": (
            data[:-3] + bytes([data[-3] ^ 0x10]) + data[-2:],
            r"is corrupted: its checksum does not match its contents",
        ),
        "record edited": (_edit_attributes(data), r"is corrupted: its checksum does not match its contents"),
        "header not JSON": (data[:8] + b"{" * n + data[8 + n :], r"is corrupted: its header is not valid JSON"),
    }
    for what, (content, message) in damaged.items():
        bad.write_bytes(content)
        with pytest.raises(SerializationError, match=message):
            _load(bad, family)
        assert str(bad) in str(_error(bad, family)), what  # the message names the file


def _edit_attributes(data: bytes) -> bytes:
    """The file with one more entry in its fusion_info record (valid JSON, valid structure: only the checksum can
    tell)."""
    n = _header_len(data)
    header = json.loads(data[8 : 8 + n])
    attributes = json.loads(header["__metadata__"]["attributes"])
    attributes[""]["fusion_info"]["forged"] = True
    header["__metadata__"]["attributes"] = json.dumps(attributes)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n :]


def _error(path, family) -> SerializationError:
    try:
        _load(path, family)
    except SerializationError as exc:
        return exc
    raise AssertionError(f"{path} loaded")


def _reforge(src: Path, dst: Path, edit) -> Path:
    """Rewrite the JSON records of a pyfusion.module/2 file with ``edit(records)`` and recompute its checksum (a
    forger's file: only the structural checks can catch it)."""
    data = src.read_bytes()
    n = _header_len(data)
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    meta = header["__metadata__"]
    records = {r: json.loads(meta[r]) for r in mf.RECORDS[1:]}
    edit(records)
    for r, v in records.items():
        meta[r] = json.dumps(v)
    entries = [(k, e["dtype"], tuple(e["shape"]), body[slice(*e["data_offsets"])]) for k, e in header.items()
               if k != "__metadata__"]  # fmt: skip
    meta["checksum"] = _digest([meta[r] for r in mf.RECORDS], entries)
    raw = json.dumps(header).encode()
    dst.write_bytes(len(raw).to_bytes(8, "little") + raw + body)
    return dst


@pytest.mark.parametrize("family", USER)
def test_user_class_needs_its_factory_and_refuses_another(saved, family, tmp_path):
    folder, _, _ = saved
    path = folder / f"{_partial_id(family)}.safetensors"
    cls = FAMILIES[family][0].__name__
    needs = rf"class '_ir_models\.{cls}'.*pass the function that builds one member, pyfusion\.load\(path, factory="
    with pytest.raises(SerializationError, match=needs + rf"\.\.\.\).*factory={cls}"):
        pyfusion.load(path)
    other = USER[(USER.index(family) + 1) % len(USER)]
    with pytest.raises(
        SerializationError,
        match=rf"the factory does not build the member architecture this file was saved with: module '<root>' is a "
        rf"_ir_models\.{FAMILIES[other][0].__name__}, the file's is a _ir_models\.{cls}",
    ):
        pyfusion.load(path, factory=FAMILIES[other][0])


def test_factory_of_the_same_class_with_other_sizes_is_refused(saved):
    from _ir_models import MHANet

    folder, _, _ = saved
    path = folder / f"{_partial_id('mha')}.safetensors"
    shape = r"parameter emb\.bias has shape \(32,\), the file's member has \(16,\)"
    with pytest.raises(SerializationError, match=r"does not build the member architecture .*: " + shape):
        pyfusion.load(path, factory=lambda: MHANet(d=32))


@pytest.mark.parametrize("family", HF)
def test_forged_hugging_face_config_is_refused(saved, family, tmp_path):
    """A config of another width (checksum recomputed) builds another member than the file describes: named."""
    folder, _, _ = saved
    src = folder / f"{_partial_id(family)}.safetensors"
    key = WIDTH_KEY[family]

    def edit(r):
        r["base"]["config"][key] *= 2

    forged = _reforge(src, tmp_path / "forged.safetensors", edit)
    with pytest.raises(SerializationError, match=r"built from the file's config does not build the member "
                                                 r"architecture this file was saved with: .* has shape"):  # fmt: skip
        pyfusion.load(forged)

    def other_class(r):
        r["base"]["class"] = "os"

    with pytest.raises(SerializationError, match=r"'os' is not a Hugging Face model class of transformers"):
        pyfusion.load(_reforge(src, tmp_path / "cls.safetensors", other_class))


# --------------------------------------------------------------------------------------------- failed saves
def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("family", ["catnet", *HF[:1], "resnet"])
@pytest.mark.parametrize("failure", ["fsync", "interrupt", "verification"])
def test_failed_save_leaves_the_previous_file_and_no_temporary(saved, family, failure, tmp_path, monkeypatch):
    _, expected, _ = saved
    fused = expected[_partial_id(family)]["model"]
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"previous")
    if failure == "fsync":

        def fsync(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", fsync)
        error, message = OSError, "No space left"
    elif failure == "interrupt":

        def check(reloaded):
            raise KeyboardInterrupt

        error, message = KeyboardInterrupt, None
    else:  # the file reads back different (a bit flipped by the disk)
        real = Path.open

        def flaky(self, mode="r", *args, **kwargs):
            f = real(self, mode, *args, **kwargs)
            if "b" in mode and "r" in mode and self.name.endswith(".tmp"):
                data = bytearray(f.read())
                f.close()
                data[-1] ^= 1
                import io

                return io.BytesIO(bytes(data))
            return f

        monkeypatch.setattr(Path, "open", flaky)
        error, message = SerializationError, "checksum does not match"
    with pytest.raises(error, match=message):
        pyfusion.save(fused, target, check=check if failure == "interrupt" else None)
    monkeypatch.undo()
    assert target.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == ["m.safetensors"]
