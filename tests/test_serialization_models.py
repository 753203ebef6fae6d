"""pyfusion.save / pyfusion.load of fused models of user classes and Hugging Face models (``pyfusion.module/2``):
member architecture (factory or config) + the changes fusion made, restored bit for bit, and a typed error for
every missing factory, wrong factory, forged class name, forged config and forged change (issues 12 and 16)."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F
from _ir_families import partial_plan, permuted_twin, randomize, run
from _ir_models import MHANet, hf_models
from torch import nn

import pyfusion
from pyfusion import serialization as ser
from pyfusion._member_files import RECORDS
from pyfusion.fuse.builder import build
from pyfusion.fuse.fast import swap_partial_modules
from pyfusion.fuse.plan import Plan
from pyfusion.graph import trace_groups
from pyfusion.nn import PartialConv2d, PartialLinear
from pyfusion.nn.norm import MemberViewNorm
from pyfusion.serialization import FORMAT_MEMBER, SerializationError

F64 = torch.float64
HF = hf_models()


class UserMLP(nn.Module):
    """A user MLP class (its constructor takes the widths)."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.hidden = hidden
        self.fc1, self.fc2, self.out = nn.Linear(6, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(F.relu(self.fc1(x)))))


class CatCNN(nn.Module):
    """A user CNN with BatchNorm, an in-place ReLU and a ``torch.cat`` skip over channels."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.a, self.b = nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, 2, 1)
        self.mix = nn.Conv2d(2 * width + 2, 6, 3, padding=1, stride=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # (B, 1, 8, 8)
        h = F.relu(self.bn(self.stem(x)), inplace=True)
        h = torch.cat([torch.relu(self.a(h)), self.b(h), h], 1)
        return self.head(F.relu(self.mix(h)).mean((2, 3)))


USER = {
    "user_mlp": (UserMLP, (torch.randn(4, 6, dtype=F64),)),
    "user_catcnn": (CatCNN, (torch.randn(2, 1, 8, 8, dtype=F64),)),
    "user_mha": (MHANet, (torch.randn(2, 5, 5, dtype=F64),)),
}
FAMILIES = {**USER, **HF}
# HF ViT's embeddings read patch_embeddings.projection.weight, which a PartialConv2d does not have: its fused
# layers stay dense here (a limit of the fast-module swap, not of the file)
NO_SWAP = {"vit"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


_CACHE: dict[tuple[str, str], tuple[nn.Module, nn.Module]] = {}


def fused_model(name: str, plan: str) -> tuple[nn.Module, nn.Module]:
    """(member 0, fused model) of a family: ``average`` through pyfusion.fuse; ``ensemble`` (alpha = 1) and
    ``partial`` (half of every group's units shared, from the true correspondences of a permuted copy) through the
    builder, then the fast modules swapped in."""
    key = (name, plan)
    if key not in _CACHE:
        factory, x = FAMILIES[name]
        a, b = randomize(factory(), 1), randomize(factory(), 2)
        if plan == "average":
            fused = pyfusion.fuse([a, b], [x[0]], method="average", reset_bn=False)
        else:
            graph = trace_groups(a, x)
            if plan == "ensemble":
                fused = build([a, b], graph, Plan.ensemble(graph, (0.3, 0.7)))
            else:
                twin, perms = permuted_twin(a, graph)
                fused = build([a, twin], graph, partial_plan(graph, perms))
            if name not in NO_SWAP and plan != "partial_dense":
                assert swap_partial_modules(fused, 2, always=True), "the plan has branch segments: fast modules swap in"
        _CACHE[key] = (a, fused.eval())
    return _CACHE[key]


def _types(model: nn.Module) -> list[tuple[str, type]]:
    return [(p, type(m)) for p, m in model.named_modules(remove_duplicate=False)]


def _same_model(loaded: nn.Module, fused: nn.Module, x) -> None:
    assert _types(loaded) == _types(fused)
    want = {k: v for k, v in fused.state_dict().items()}
    got = loaded.state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    for a, b in zip(run(loaded, x), run(fused, x)):
        assert torch.equal(a, b)  # bit for bit
    assert loaded.fusion_layouts == {k: list(v) for k, v in fused.fusion_layouts.items()}
    assert loaded.fusion_checksum == "verified" and not loaded.training


@pytest.mark.parametrize("plan", ["average", "ensemble", "partial"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_fused_model_round_trip(tmp_path, name, plan):
    factory, x = FAMILIES[name]
    _, fused = fused_model(name, plan)
    path = pyfusion.save(fused, tmp_path / "fused.safetensors")
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert header["__metadata__"]["format"] == FORMAT_MEMBER
    loaded = pyfusion.load(path, factory=factory if name in USER else None)
    _same_model(loaded, fused, x)
    if plan != "average" and name not in NO_SWAP:  # the fast modules come back as fast modules
        assert any(isinstance(m, (PartialLinear, PartialConv2d)) for m in loaded.modules())
    if plan == "ensemble" and any(isinstance(m, MemberViewNorm) for m in fused.modules()):
        # member norms (LayerNorm, LlamaRMSNorm...) rebuilt from the member architecture, one per member
        norms = [n for m in loaded.modules() if isinstance(m, MemberViewNorm) for n in m.norms]
        assert norms and all(not isinstance(n, MemberViewNorm) for n in norms)


def test_user_class_file_needs_its_factory_and_names_it(tmp_path):
    _, fused = fused_model("user_mlp", "partial")
    path = pyfusion.save(fused, tmp_path / "f.safetensors")
    with pytest.raises(SerializationError, match=r"class '.*UserMLP'.*factory=UserMLP"):
        pyfusion.load(path)
    assert isinstance(pyfusion.load(path, factory=UserMLP), UserMLP)


def test_factory_must_be_callable(tmp_path):
    _, fused = fused_model("user_mlp", "average")
    path = pyfusion.save(fused, tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match="factory must be a callable"):
        pyfusion.load(path, factory=3)


WRONG_FACTORIES = {
    "wider": (lambda: UserMLP(hidden=16), r"parameter fc1\.\w+ has shape \(16.*\), the file's member has \(8"),
    "other class": (lambda: CatCNN(), r"module '<root>' is a .*CatCNN, the file's is a .*UserMLP"),
    "attribute": (lambda: _with(UserMLP(), hidden=9), r"attribute <root>.hidden is 9, the file's member has 8"),
    "not a module": (lambda: "UserMLP", r"the factory returned str, not a torch.nn.Module"),
    "raises": (lambda: UserMLP(hidden="8"), r"the factory raised TypeError"),
}


def _with(m: nn.Module, **attrs) -> nn.Module:
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


@pytest.mark.parametrize("case", list(WRONG_FACTORIES))
def test_factory_of_another_architecture_is_refused(tmp_path, case):
    factory, message = WRONG_FACTORIES[case]
    _, fused = fused_model("user_mlp", "partial")
    path = pyfusion.save(fused, tmp_path / "f.safetensors")
    with pytest.raises(SerializationError, match=message):
        pyfusion.load(path, factory=factory)


def test_head_count_of_the_factory_is_checked(tmp_path):
    """Same shapes, another head count: nn.MultiheadAttention's num_heads is part of the member architecture."""
    _, fused = fused_model("user_mha", "partial")
    path = pyfusion.save(fused, tmp_path / "f.safetensors")
    with pytest.raises(SerializationError, match=r"attribute mha\.(head_dim is 8|num_heads is 2), the file's member"):
        pyfusion.load(path, factory=lambda: MHANet(heads=2))


def test_factory_returning_a_live_model_leaves_it_unchanged(tmp_path):
    member, fused = fused_model("user_mha", "ensemble")
    path = pyfusion.save(fused, tmp_path / "f.safetensors")
    before = {k: v.clone() for k, v in member.state_dict().items()}
    types = _types(member)
    loaded = pyfusion.load(path, factory=lambda: member)
    assert _types(member) == types and all(torch.equal(v, member.state_dict()[k]) for k, v in before.items())
    _same_model(loaded, fused, USER["user_mha"][1])


def test_save_with_a_factory_checks_it_against_the_fusion_record(tmp_path):
    _, fused = fused_model("user_mlp", "partial")
    target = tmp_path / "f.safetensors"
    pyfusion.save(fused, target, factory=UserMLP)  # the right one
    before = target.read_bytes()
    with pytest.raises(SerializationError, match=r"save: the factory does not build the member architecture"):
        pyfusion.save(fused, target, factory=lambda: UserMLP(hidden=16))
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


def test_reloaded_model_saves_again(tmp_path):
    factory, x = USER["user_catcnn"]
    _, fused = fused_model("user_catcnn", "partial")
    once = pyfusion.load(pyfusion.save(fused, tmp_path / "a.safetensors"), factory=factory)
    twice = pyfusion.load(pyfusion.save(once, tmp_path / "b.safetensors"), factory=factory)
    _same_model(twice, fused, x)


def test_attributes_set_on_kept_modules_are_restored(tmp_path):
    _, fused = fused_model("user_mlp", "average")
    fused.fc1.note = "kept"  # a plain attribute on an allowlisted module fusion kept: a 'set' change
    try:
        loaded = pyfusion.load(pyfusion.save(fused, tmp_path / "f.safetensors"), factory=UserMLP)
    finally:
        del fused.fc1.note
    assert loaded.fc1.note == "kept"


def test_undescribable_model_is_refused_and_writes_nothing(tmp_path):
    """A module of the member's class moved to a path where the member has another class cannot be described."""
    member, fused = fused_model("user_mha", "average")
    target = tmp_path / "f.safetensors"
    target.write_bytes(b"previous")
    odd = MHANet()
    odd.fusion_member_architecture = fused.fusion_member_architecture
    odd.ff1 = nn.MultiheadAttention(16, 4)  # not allowlisted, and the member has a Linear there
    with pytest.raises(SerializationError, match=r"module 'ff1' of type .*MultiheadAttention.*not in the member"):
        pyfusion.save(odd, target)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


def test_failed_check_keeps_the_old_file(tmp_path):
    _, fused = fused_model("user_mlp", "partial")
    target = tmp_path / "f.safetensors"
    target.write_bytes(b"previous")

    def check(reloaded):
        raise ValueError("outputs differ")

    with pytest.raises(ValueError, match="outputs differ"):
        pyfusion.save(fused, target, check=check)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


# --------------------------------------------------------------------------------------------- Hugging Face
@pytest.mark.skipif("gpt2" not in HF, reason="transformers is not installed")
def test_gpt2_ties_kept_by_permutation_fusion_and_untied_by_partial_fusion(tmp_path):
    factory, x = HF["gpt2"]
    a = randomize(factory(), 1)
    graph = trace_groups(a, x)
    twin, perms = permuted_twin(a, graph)
    full = build([a, twin], graph, Plan.from_permutations(graph, {g: [torch.arange(len(p)), torch.argsort(p)]
                                                                  for g, p in perms.items()}, (0.5, 0.5)))  # fmt: skip
    assert full.lm_head.weight is full.transformer.wte.weight
    loaded = pyfusion.load(pyfusion.save(full, tmp_path / "full.safetensors"))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # one tensor again, stored once
    assert loaded.config.tie_word_embeddings is True
    _same_model(loaded, full.eval(), x)
    _, partial = fused_model("gpt2", "partial")
    assert partial.config.tie_word_embeddings is False and partial.fusion_untied_params
    path = pyfusion.save(partial, tmp_path / "partial.safetensors")
    assert _records(path)["ties"] == []  # the fused lm_head is its own tensor
    loaded = pyfusion.load(path)
    # the head writes shared logits (no zero block): it stays whatever the swap made it
    assert type(loaded.lm_head) is type(partial.lm_head) and loaded.config.tie_word_embeddings is False
    _same_model(loaded, partial, x)


@pytest.mark.skipif("bert" not in HF, reason="transformers is not installed")
def test_hf_config_keeps_the_member_widths_and_the_changes_carry_the_fused_ones(tmp_path):
    """The config rebuilds the members; the fused widths are per-module changes. Hugging Face's own loader refuses
    the fused weights against that config (size mismatch) instead of silently rebuilding the member widths."""
    import transformers as tf

    member, fused = fused_model("bert", "partial")
    path = pyfusion.save(fused, tmp_path / "f.safetensors")
    meta = _records(path)
    assert meta["base"]["kind"] == "huggingface" and meta["base"]["class"] == "BertForSequenceClassification"
    assert meta["base"]["config"]["hidden_size"] == member.config.hidden_size == 32
    assert meta["base"]["attn_implementation"] == member.config._attn_implementation
    widened = {op["path"] for op in meta["changes"] if op["op"] in ("replace", "resize")}
    assert "bert.encoder.layer.0.intermediate.dense" in widened
    fused.save_pretrained(tmp_path / "hf")
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        tf.BertForSequenceClassification.from_pretrained(tmp_path / "hf")


@pytest.mark.skipif("llama" not in HF, reason="transformers is not installed")
def test_hf_file_ignores_a_factory_and_keeps_non_persistent_buffers(tmp_path):
    _, fused = fused_model("llama", "partial")
    loaded = pyfusion.load(pyfusion.save(fused, tmp_path / "f.safetensors"), factory=lambda: 1 / 0)
    # rotary inv_freq is a non-persistent buffer: stored all the same (float64 here, as the fused model holds it)
    assert loaded.model.rotary_emb.inv_freq.dtype == fused.model.rotary_emb.inv_freq.dtype
    assert torch.equal(loaded.model.rotary_emb.inv_freq, fused.model.rotary_emb.inv_freq)


# --------------------------------------------------------------------------------------------- forged files
def _split(path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _records(path) -> dict:
    meta = _split(path)[0]["__metadata__"]
    return {k: json.loads(meta[k]) for k in RECORDS[1:]}


def reforge(path, out, edit=None, tensors=None):
    """Rewrite a file's records with ``edit(records)`` (and tensor bytes with ``tensors(name, bytes) -> bytes``), then
    recompute its checksum, so that only the structural checks can catch the forgery."""
    header, body = _split(path)
    meta = header["__metadata__"]
    records = {k: json.loads(meta[k]) for k in RECORDS[1:]}
    if edit is not None:
        edit(records)
    for k in RECORDS[1:]:
        meta[k] = json.dumps(records[k])
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    body = bytearray(body)
    if tensors is not None:
        for k, e in entries.items():
            s, t = e["data_offsets"]
            body[s:t] = tensors(k, bytes(body[s:t]))
    meta["checksum"] = ser._digest(
        [meta[r] for r in RECORDS],
        ((k, e["dtype"], tuple(e["shape"]), bytes(body[e["data_offsets"][0] : e["data_offsets"][1]])) for k, e in
         entries.items()),
    )  # fmt: skip
    raw = json.dumps(header).encode()
    out.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(body))
    return out


def _op(records, op, path=None):
    return next(o for o in records["changes"] if o["op"] == op and (path is None or o["path"] == path))


HF_FORGERIES = {
    "class os.system": (lambda r: r["base"].update({"class": "os.system"}), "is not a plain class name"),
    "class PreTrainedModel": (lambda r: r["base"].update({"class": "PreTrainedModel"}), "not a Hugging Face model"),
    "class is a config": (lambda r: r["base"].update({"class": "GPT2Config"}), "not a Hugging Face model class"),
    "class is an auto class": (lambda r: r["base"].update({"class": "AutoModel"}), "not a Hugging Face model class"),
    "class unknown": (lambda r: r["base"].update({"class": "NoSuchModel"}), "not a Hugging Face model class"),
    "class of another model": (lambda r: r["base"].update({"class": "BertModel"}), "for model type 'gpt2'"),
    "attention from the hub": (
        lambda r: r["base"].update({"attn_implementation": "kernels-community/flash-attn"}),
        "attention implementation",
    ),
    "config attn key": (lambda r: r["base"]["config"].update({"_attn_implementation_internal": "x/y"}), "may not"),
    "config auto_map": (lambda r: r["base"]["config"].update({"auto_map": {"AutoModel": "evil.Model"}}), "may not"),
    "config wider": (lambda r: r["base"]["config"].update({"n_embd": 64}), "does not build the member architecture"),
    "config huge vocab": (
        lambda r: r["base"]["config"].update({"vocab_size": 10**9}),
        r"shape \(1000000000, 32\), the file's member has \(100, 32\)",
    ),
    "config with a million layers": (
        lambda r: r["base"]["config"].update({"n_layer": 10**6}),
        r"the config builds more than \d+ modules, the file describes",
    ),
    "config not an object": (lambda r: r["base"].update({"config": [1]}), "has no config object"),
    "kind unknown": (lambda r: r["base"].update({"kind": "python"}), "neither 'user' nor 'huggingface'"),
}


@pytest.mark.skipif("gpt2" not in HF, reason="transformers is not installed")
@pytest.mark.parametrize("case", list(HF_FORGERIES))
def test_forged_hf_file_is_a_serialization_error(tmp_path, case):
    edit, message = HF_FORGERIES[case]
    _, fused = fused_model("gpt2", "partial")
    path = reforge(pyfusion.save(fused, tmp_path / "f.safetensors"), tmp_path / "forged.safetensors", edit)
    t0 = time.perf_counter()
    with pytest.raises(SerializationError, match=message):
        pyfusion.load(path)
    assert time.perf_counter() - t0 < 5.0  # nothing of the forged sizes is allocated


@pytest.mark.skipif("gpt2" not in HF, reason="transformers is not installed")
def test_config_and_member_record_forged_together_still_disagree_with_the_tensors(tmp_path):
    """A forgery consistent in the config and the member description is caught by the tensors of the file."""
    _, fused = fused_model("gpt2", "average")
    path = pyfusion.save(fused, tmp_path / "f.safetensors")

    def edit(r):
        r["base"]["config"]["vocab_size"] = 120
        r["base"]["modules"]["transformer.wte"]["parameters"]["weight"] = [120, 32]
        r["base"]["modules"]["lm_head"]["parameters"]["weight"] = [120, 32]
        r["base"]["modules"]["transformer.wte"]["attributes"]["num_embeddings"] = 120
        r["base"]["modules"]["lm_head"]["attributes"]["out_features"] = 120

    forged = reforge(path, tmp_path / "forged.safetensors", edit)
    with pytest.raises(SerializationError, match=r"'transformer.wte.weight' has shape \(100, 32\) in the file.*"
                                                 r"expects \(120, 32\)"):  # fmt: skip
        pyfusion.load(forged)


def _huge(r):
    _op(r, "resize", "mha")["tensors"]["in_proj_weight"] = [30000, 30000]


USER_FORGERIES = {
    "resize to a huge shape": (_huge, r"'mha.in_proj_weight' has shape \(72, 24\) in the file.*\(30000, 30000\)"),
    "resize a missing tensor": (
        lambda r: _op(r, "resize", "mha")["tensors"].update({"nope": [2]}),
        "has no tensor 'nope' to resize",
    ),
    "set forward": (
        lambda r: _op(r, "set", "mha")["attributes"].update({"forward": 1}),
        "which MultiheadAttention defines",
    ),
    "set training": (lambda r: _op(r, "set", "mha")["attributes"].update({"training": True}), "may not set"),
    "set a dunder": (lambda r: _op(r, "set", "mha")["attributes"].update({"__class__": 1}), "not an identifier"),
    "set a list of lists": (lambda r: _op(r, "set", "mha")["attributes"].update({"num_heads": [[1]]}), "plain value"),
    "replace the root": (lambda r: _op(r, "replace", "ln1").update({"path": ""}), "replaces the root module"),
    "replace under a missing parent": (
        lambda r: _op(r, "replace", "ln1").update({"path": "nope.ln1"}),
        "has no module 'nope'",
    ),
    "unknown op": (
        lambda r: r["changes"].append({"op": "exec", "path": "x"}),
        "op 'replace', 'resize', 'set' or 'config'",
    ),
    "path with empty segment": (lambda r: _op(r, "resize", "mha").update({"path": "a..b"}), "not a module path"),
    "member record short": (lambda r: r["base"]["modules"].pop("ff1"), "has a module 'ff1'"),
    "member record class": (
        lambda r: r["base"]["modules"]["ff1"].update({"class": "torch.nn.Conv2d"}),
        "module 'ff1' is a torch.nn.modules.linear.Linear, the file's is a torch.nn.Conv2d",
    ),
    "user base with a config": (lambda r: r["base"].update({"config": {}}), "user-class base has a config"),
    "ties name a missing tensor": (lambda r: r["ties"].append(["mha.in_proj_bias", "nope"]), "names tensor 'nope'"),
    "ties of other shapes": (lambda r: r["ties"].append(["mha.in_proj_bias", "mha.out_proj.bias"]), "differ in shape"),
    "ties name a tensor twice": (lambda r: r["ties"].append(["a", "a"]), "names a tensor twice"),
    "changes too many": (
        lambda r: r["changes"].extend([{"op": "set", "path": "", "attributes": {}}] * ser.MAX_NODES),
        "at most",
    ),
    "member path too deep": (
        lambda r: r["base"]["modules"].update({".".join(["a"] * (ser.MAX_DEPTH + 1)): {"class": "x"}}),
        "at most 64 levels",
    ),
    "mvn config of another width": (
        lambda r: _op(r, "replace", "ln1")["module"]["config"]["members"][0].update({"width": 15}),
        r"cannot rebuild module 'ln1' of type .*MemberViewNorm: ValueError: a member entry",
    ),
}


@pytest.mark.parametrize("case", list(USER_FORGERIES))
def test_forged_user_file_is_a_serialization_error(tmp_path, case):
    edit, message = USER_FORGERIES[case]
    _, fused = fused_model("user_mha", "partial_dense")  # the resized nn.MultiheadAttention is in the file
    path = reforge(pyfusion.save(fused, tmp_path / "f.safetensors"), tmp_path / "forged.safetensors", edit)
    t0 = time.perf_counter()
    with pytest.raises(SerializationError, match=message):
        pyfusion.load(path, factory=MHANet)
    assert time.perf_counter() - t0 < 5.0


def _leaf(r):
    """The first @member leaf of the changes (a copy of the member's UserRMSNorm inside a MemberViewNorm)."""
    for op in r["changes"]:
        if op["op"] == "replace":
            stack = [op["module"]]
            while stack:
                node = stack.pop()
                if node["type"] == "@member":
                    return node
                stack.extend(node.get("children", {}).values())
    raise AssertionError("no member leaf")


LEAF_FORGERIES = {
    "source missing": (lambda r: _leaf(r).update({"source": "nope"}), "copies member module 'nope', which does not"),
    "source of another class": (
        lambda r: _leaf(r).update({"source": "gate"}),
        "copies member module 'gate' as a .*UserRMSNorm, but it is a .*Linear",
    ),
    "leaf with children": (lambda r: _leaf(r).update({"children": {}}), "member node .* is malformed"),
    "leaf in a plain tree": (lambda r: _leaf(r).update({"type": "torch.nn.Identity"}), "unknown fields"),
}


@pytest.mark.parametrize("case", list(LEAF_FORGERIES))
def test_forged_member_leaf_is_a_serialization_error(tmp_path, case):
    from _ir_models import GatedRMSNet

    edit, message = LEAF_FORGERIES[case]
    a, b = randomize(GatedRMSNet(), 1), randomize(GatedRMSNet(), 2)
    graph = trace_groups(a, (torch.randint(0, 20, (3, 4)),))
    fused = build([a, b], graph, Plan.ensemble(graph, (0.5, 0.5)))
    path = reforge(pyfusion.save(fused, tmp_path / "f.safetensors"), tmp_path / "forged.safetensors", edit)
    with pytest.raises(SerializationError, match=message):
        pyfusion.load(path, factory=GatedRMSNet)


def test_forged_member_view_index_is_refused(tmp_path):
    """An index buffer of a MemberViewNorm pointing outside its slots (checksum recomputed) is refused on load."""
    _, fused = fused_model("user_mha", "partial")
    path = pyfusion.save(fused, tmp_path / "f.safetensors")

    def poke(name, data):
        if name == "ln1.b_index_0":
            return (10**6).to_bytes(8, "little") + data[8:]
        return data

    forged = reforge(path, tmp_path / "forged.safetensors", tensors=poke)
    with pytest.raises(SerializationError, match=r"module 'ln1' \(MemberViewNorm\): b_index_0 holds indices outside"):
        pyfusion.load(forged, factory=MHANet)


def test_member_file_bit_flips_are_refused(tmp_path):
    """Single-bit flips over a user-class file (records and tensors, every 131st bit): each a SerializationError."""
    _, fused = fused_model("user_mlp", "partial")
    data = pyfusion.save(fused, tmp_path / "f.safetensors").read_bytes()
    flipped = tmp_path / "flipped.safetensors"
    for i in range(0, 8 * len(data), 131):
        b = bytearray(data)
        b[i // 8] ^= 1 << (i % 8)
        flipped.write_bytes(bytes(b))
        try:
            pyfusion.load(flipped, factory=UserMLP)
        except SerializationError:
            continue
        raise AssertionError(f"flipping bit {i % 8} of byte {i // 8} loaded without an error")


def test_member_file_needs_its_checksum(tmp_path):
    _, fused = fused_model("user_mlp", "average")
    header, body = _split(pyfusion.save(fused, tmp_path / "f.safetensors"))
    del header["__metadata__"]["checksum"]
    raw = json.dumps(header).encode()
    (tmp_path / "old.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + body)
    with pytest.raises(SerializationError, match="it has no checksum record"):
        pyfusion.load(tmp_path / "old.safetensors", factory=UserMLP)


def test_builder_records_the_member_architecture_only_where_needed():
    member, fused = fused_model("user_mlp", "partial")
    record = fused.fusion_member_architecture
    assert isinstance(record.module, UserMLP) and record.module.fc1.weight.is_meta
    assert record.module.fc1.weight.shape == member.fc1.weight.shape
    if HF:
        assert not hasattr(fused_model("bert", "average")[1], "fusion_member_architecture")  # rebuilt from config
    from pyfusion.models import mlp

    ms = [mlp([6, 8, 3]) for _ in range(2)]
    assert not hasattr(pyfusion.fuse(ms, [torch.randn(4, 6)], method="average"), "fusion_member_architecture")
