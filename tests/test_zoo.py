"""The model zoo (bench/zoo.py) on its tiny variants: training, cache, determinism, splits, baselines, text data.

Every case here trains a few hundred samples for two epochs into a temporary cache (seconds).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pyfusion import data as pdata
from pyfusion.train import as_logits, ensemble_accuracy, evaluate, lm_perplexity, perplexity, train

ROOT = Path(__file__).resolve().parent.parent


def _import_zoo():
    if "zoo" in sys.modules:
        return sys.modules["zoo"]
    spec = importlib.util.spec_from_file_location("zoo", ROOT / "bench" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo"] = module
    spec.loader.exec_module(module)
    return module


zoo = _import_zoo()


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------ names / registry


def test_default_case_names_parse_and_round_trip():
    assert len(zoo.DEFAULT_CASES) == len(set(zoo.DEFAULT_CASES)) > 40
    for name in zoo.DEFAULT_CASES:
        assert zoo.parse_case(name).name == name
    ks = [zoo.parse_case(n).k for n in zoo.DEFAULT_CASES]
    assert ks == sorted(ks)  # built K = 2 first, then 4, then 8
    for must in ("mnist/mlp/iid/K2", "fmnist/vgg_bn/dirichlet0.5/K4", "mnist/resnet/shard/K2", "digits/mlp/iid/K8",
                 "mnist/vit/iid/K2", "mnist/mlp/iid/K2/shared_init", "text/gpt2/K2", "text/llama_gqa/K2"):  # fmt: skip
        assert must in zoo.DEFAULT_CASES
    spec = zoo.parse_case("digits/mlp_celu/dirichlet/K3/shared_init/tiny")
    assert (spec.dataset, spec.arch, spec.split, spec.k, spec.shared_init, spec.tiny) == (
        "digits", "mlp_celu", "dirichlet", 3, True, True)  # fmt: skip
    assert spec.init_seeds == [0, 0, 0] and spec.seeds == [0, 1, 2]
    assert zoo.case_names("digits/mlp/*/K8") == ["digits/mlp/iid/K8", "digits/mlp/dirichlet0.5/K8",
                                                 "digits/mlp/shard/K8"]  # fmt: skip
    assert zoo.case_names("text/gpt2/K3") == ["text/gpt2/K3"]  # any grammatical name


@pytest.mark.parametrize(
    "name, needle",
    [
        ("mnist/mlp/iid", "image case"),
        ("cifar/mlp/iid/K2", "dataset"),
        ("mnist/lenet/iid/K2", "arch"),
        ("mnist/mlp/random/K2", "split"),
        ("mnist/mlp/dirichlet0/K2", "concentration"),
        ("mnist/mlp/iid/K0", "K<k>"),
        ("mnist/mlp/shard/K11", "k <= 10"),
        ("text/vit/K2", "text arch"),
    ],
)
def test_bad_case_names_are_refused(name, needle):
    with pytest.raises(ValueError, match=needle):
        zoo.parse_case(name)


# ------------------------------------------------------------------------------------------------ cache


def test_case_trains_caches_and_reloads_bit_identically(tmp_path, monkeypatch):
    name = "digits/mlp/iid/K2/tiny"
    first = zoo.get_case(name, cache=str(tmp_path))
    files = sorted(os.listdir(tmp_path / "members"))
    assert len([f for f in files if f.endswith(".safetensors")]) == 2
    assert len([f for f in files if f.endswith(".json")]) == 2
    assert not [f for f in files if f.startswith(".tmp-")]
    assert first.k == 2 and all(not m.training for m in first.members)
    assert first.seeds == [0, 1] and first.init_seeds == [0, 1]
    assert first.records[0]["threads"] == 1 and first.records[0]["train_time_s"] >= 0

    def no_training(*args, **kwargs):
        raise AssertionError("a cached member was retrained")

    monkeypatch.setattr(zoo, "_train_member", no_training)
    again = zoo.get_case(name, cache=str(tmp_path), train_missing=False)
    for a, b in zip(first.members, again.members):
        assert _states_equal(a, b)
        assert torch.equal(a(first.test[0]), b(first.test[0]))
    assert [r["key"] for r in first.records] == [r["key"] for r in again.records]
    # The recorded test accuracy is the member's accuracy on the case's test set.
    for m, r in zip(again.members, again.records):
        assert r["test"] == evaluate(m, again.loader("test"))


def test_missing_member_without_training_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not in the zoo cache"):
        zoo.get_case("digits/mlp/iid/K1/tiny", cache=str(tmp_path), train_missing=False)


def test_corrupted_weights_are_retrained_identically(tmp_path):
    name = "digits/vgg_bn/iid/K1/tiny"
    first = zoo.get_case(name, cache=str(tmp_path))
    (weights,) = (tmp_path / "members").glob("*.safetensors")
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(FileNotFoundError), pytest.warns(UserWarning, match="does not match the SHA-256"):
        zoo.get_case(name, cache=str(tmp_path), train_missing=False)  # a damaged file is never loaded
    with pytest.warns(UserWarning, match="does not match"):
        again = zoo.get_case(name, cache=str(tmp_path))
    assert _states_equal(first.members[0], again.members[0])


def test_training_is_deterministic_for_a_seed(tmp_path):
    # BatchNorm + a Dirichlet split: two fresh caches give bit-identical members (weights and running stats).
    name = "digits/vgg_bn/dirichlet0.5/K2/tiny"
    a = zoo.get_case(name, cache=str(tmp_path / "a"))
    b = zoo.get_case(name, cache=str(tmp_path / "b"))
    for ma, mb in zip(a.members, b.members):
        assert _states_equal(ma, mb)
    assert [r["test"] for r in a.records] == [r["test"] for r in b.records]
    # ... and different seeds give different members.
    assert not torch.equal(a.members[0].state_dict()["0.weight"], a.members[1].state_dict()["0.weight"])


def test_shared_init_shares_the_initialization_and_the_cache(tmp_path):
    iid = zoo.get_case("digits/mlp/iid/K2/tiny", cache=str(tmp_path))
    shared = zoo.get_case("digits/mlp/iid/K2/shared_init/tiny", cache=str(tmp_path))
    assert shared.init_seeds == [0, 0] and shared.seeds == [0, 1]
    # Member 0 is the same member (same definition, one cache entry); member 1 differs only by its init seed.
    assert shared.records[0]["key"] == iid.records[0]["key"]
    assert shared.records[1]["key"] != iid.records[1]["key"]
    assert shared.records[1]["definition"]["init_seed"] == 0
    assert len(list((tmp_path / "members").glob("*.safetensors"))) == 3
    # A K = 2 IID case is the first two members of the K = 4 case.
    k4 = zoo.get_case("digits/mlp/iid/K4/tiny", cache=str(tmp_path))
    assert [r["key"] for r in k4.records[:2]] == [r["key"] for r in iid.records]


# ------------------------------------------------------------------------------------------------ data and splits


def test_calibration_is_a_class_balanced_slice_of_the_training_set():
    d = zoo._load_data("digits", False)
    xtr, ytr = pdata.load_digits("train")
    assert d.info["n_pool"] + d.info["n_calib"] == ytr.shape[0]
    assert np.bincount(d.calib[1].numpy(), minlength=10).tolist() == [20] * 10
    # Pool and calibration together are the training set (as multisets of rows), the test set is the official one.
    both = torch.cat([d.pool[0], d.calib[0]]).flatten(1)
    assert torch.equal(torch.sort(both.sum(1)).values, torch.sort(xtr.flatten(1).sum(1)).values)
    assert torch.equal(d.test[1], pdata.load_digits("test")[1])


def test_split_kinds_give_the_documented_class_shares(tmp_path):
    iid = zoo.get_case("digits/mlp/iid/K2/tiny", cache=str(tmp_path))
    assert np.array_equal(iid.class_shares(), np.ones((2, 10)))
    for k in (2, 4):
        shard = zoo.get_case(f"digits/mlp/shard/K{k}/tiny", cache=str(tmp_path))
        shares = shard.class_shares()
        assert set(np.unique(shares)) <= {0.0, 1.0} and np.allclose(shares.sum(0), 1.0)
        owned = (shares == 1.0).sum(1)
        assert owned.max() - owned.min() <= 1  # classes dealt as evenly as possible
        for m in range(k):
            assert set(shard.member_data(m)[1].tolist()) == set(np.flatnonzero(shares[m] == 1.0).tolist())
            assert shard.records[m]["train_samples"] == len(shard.member_indices[m])
    case = zoo.get_case("digits/mlp/dirichlet0.5/K4/tiny", cache=str(tmp_path))
    expected = pdata.dirichlet_split(case.train[1], 4, concentrations=np.full(4, 0.5), seed=0)
    for got, want in zip(case.member_indices, expected):
        assert np.array_equal(got, want)
    assert np.allclose(case.class_shares().sum(0), 1.0)  # a partition of the pool
    paper = zoo._split_indices(case.train[1], "dirichlet", 4, 1)
    assert np.array_equal(paper, pdata.dirichlet_split(case.train[1], 4, seed=0)[1])


def test_mnist_case(tmp_path, shared_data_dir, monkeypatch):
    monkeypatch.setenv("PYFUSION_DATA", shared_data_dir)
    case = zoo.get_case("mnist/cnn/shard/K2/tiny", cache=str(tmp_path))
    assert case.test[0].shape[1:] == (1, 28, 28) and case.calib[0].shape[0] == 100
    assert np.allclose(case.class_shares().sum(0), 1.0)
    assert case.records[0]["definition"]["arch_config"]["in_channels"] == 1


# ------------------------------------------------------------------------------------------------ baselines


def _random_outputs(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_best_subset_and_subset_mean_against_brute_force(combine):
    k, n, c = 5, 60, 4
    out = _random_outputs(0, (k, n, c))
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(1))
    lam = torch.tensor([0.1, 0.3, 0.2, 0.15, 0.25], dtype=torch.float64)
    for m in range(1, k + 1):
        values = {}
        for sub in itertools.combinations(range(k), m):
            w = torch.zeros(k, dtype=torch.float64)
            w[list(sub)] = lam[list(sub)] / lam[list(sub)].sum()
            z = sum(w[i] * (out[i].double() if combine == "logits" else torch.softmax(out[i].double(), -1))
                    for i in range(k))  # fmt: skip
            values[sub] = float((z.argmax(1) == y).double().mean())
        sub, value = zoo.best_subset(out, y, m, "classification", lam, combine)
        assert value == max(values.values()) and values[sub] == value
        assert zoo.subset_mean(out, y, m, "classification", lam, combine) == pytest.approx(
            np.mean(list(values.values())), abs=1e-12
        )


def test_best_subset_for_language_models_minimizes_perplexity():
    k, w, t, v = 4, 3, 5, 7
    out = _random_outputs(2, (k, w, t, v))
    y = torch.randint(0, v, (w, t), generator=torch.Generator().manual_seed(3))
    for m in (1, 2, 3):
        ppl = {}
        for sub in itertools.combinations(range(k), m):
            z = out[list(sub)].double().mean(0)
            nll = -torch.log_softmax(z, -1).gather(-1, y[..., None]).mean()
            ppl[sub] = math.exp(float(nll))
        sub, value = zoo.best_subset(out, y, m, "lm")
        assert value == pytest.approx(min(ppl.values()), rel=1e-12) and ppl[sub] == pytest.approx(value, rel=1e-12)
        assert zoo.subset_mean(out, y, m, "lm") == pytest.approx(np.mean(list(ppl.values())), rel=1e-12)
    # The probability ensemble's perplexity is that of the mixture sum_k w_k p_k.
    mix = torch.softmax(out.double(), -1).mean(0)
    want = math.exp(float(-torch.log(mix.gather(-1, y[..., None])).mean()))
    got = zoo.metric_value(zoo.combine_outputs(out, torch.full((k,), 1 / k), "probs"), y, "lm", "probs")
    assert got == pytest.approx(want, rel=1e-12)


def test_baselines_of_a_case(tmp_path):
    case = zoo.get_case("digits/mlp/shard/K4/tiny", cache=str(tmp_path))
    rows = {r.method: r for r in zoo.baselines(case)}
    test_loader = case.loader("test")
    f1 = zoo.count_flops(case.members[0], case.example)
    p1 = sum(p.numel() for p in case.members[0].parameters())
    for i, m in enumerate(case.members):
        assert rows[f"member {i}"].value == evaluate(m, test_loader)
        assert rows[f"member {i}"].calib_value == evaluate(m, case.loader("calib"))
    ens = rows["ensemble (logits)"]
    assert ens.value == ensemble_accuracy(case.members, test_loader)
    assert rows["ensemble (probs)"].value == ensemble_accuracy(case.members, test_loader, combine="probs")
    assert (ens.m, ens.flops, ens.params, ens.flops_ratio) == (4, 4 * f1, 4 * p1, 1.0)
    shares = torch.as_tensor(case.class_shares())
    assert rows["ensemble (probs x class shares)"].value == ensemble_accuracy(
        case.members, test_loader, per_class_weights=shares, combine="probs"
    )
    best_cal = rows["best member (calibration)"]
    assert best_cal.calib_value == max(rows[f"member {i}"].calib_value for i in range(4))
    assert rows["best member (test, oracle)"].value == max(rows[f"member {i}"].value for i in range(4))
    for m in (2, 3):
        for combine in ("logits", "probs"):
            best = rows[f"sub-ensemble best {m}/4 (calibration, {combine})"]
            mean = rows[f"sub-ensemble mean {m}/4 ({combine})"]
            assert len(best.members) == m and best.flops == m * f1 and best.params == m * p1
            assert best.flops_ratio == pytest.approx(m / 4) and mean.flops == m * f1
            sub_models = [case.members[i] for i in best.members]
            assert best.value == ensemble_accuracy(sub_models, test_loader, combine=combine)
            explicit = [ensemble_accuracy([case.members[i] for i in s], test_loader, combine=combine)
                        for s in itertools.combinations(range(4), m)]  # fmt: skip
            assert mean.value == pytest.approx(np.mean(explicit), abs=1e-12)
    # Vanilla averaging: the plain mean of the parameters, evaluated like any model.
    avg = zoo.build_model("mlp", case.records[0]["definition"]["arch_config"])
    states = [m.state_dict() for m in case.members]
    avg.load_state_dict({n: sum(s[n] for s in states) / 4 for n in states[0]})
    assert rows["vanilla average"].value == evaluate(avg, test_loader)
    assert rows["vanilla average"].flops == f1 and rows["vanilla average"].m == 1


def test_baselines_refuse_bad_lambdas(tmp_path):
    case = zoo.get_case("digits/mlp/iid/K2/tiny", cache=str(tmp_path))
    with pytest.raises(ValueError, match="sum to 1"):
        zoo.baselines(case, lambdas=[0.5, 0.6])


def test_vanilla_average_of_batchnorm_members_and_errors(tmp_path):
    case = zoo.get_case("digits/vgg_bn/iid/K2/tiny", cache=str(tmp_path))
    avg = zoo.vanilla_average(case.members, [0.25, 0.75])
    s0, s1, sa = case.members[0].state_dict(), case.members[1].state_dict(), avg.state_dict()
    for n, v in sa.items():
        if v.is_floating_point():
            assert torch.allclose(v.double(), 0.25 * s0[n].double() + 0.75 * s1[n].double(), atol=1e-7)
        else:
            assert torch.equal(v, s0[n])  # num_batches_tracked from member 0
    with pytest.raises(ValueError, match="different state dict"):
        zoo.vanilla_average([case.members[0], nn.Linear(2, 2)])


def test_count_flops_matches_pyfusion_cost_on_weight_layer_networks(tmp_path):
    import pyfusion

    for name in ("digits/mlp/iid/K1/tiny", "digits/vgg_bn/iid/K1/tiny", "digits/resnet/iid/K1/tiny",
                 "digits/cnn/iid/K1/tiny"):  # fmt: skip
        case = zoo.get_case(name, cache=str(tmp_path))
        assert zoo.count_flops(case.members[0], case.example) == pyfusion.cost(case.members[0], case.example).flops
    mlp = zoo.MLPNet(64, 32, 10)
    assert zoo.count_flops(mlp, torch.zeros(3, 1, 8, 8)) == 2 * (64 * 32 + 32 * 32 + 32 * 10)


def test_count_flops_includes_attention():
    pytest.importorskip("transformers")
    cfg = zoo.arch_config("vit", "mnist", tiny=True)
    vit = zoo.build_model("vit", cfg)
    t, d, i = 17, cfg["hidden_size"], cfg["intermediate_size"]  # 16 patches of 7x7 + the CLS token
    macs = 16 * 49 * d + cfg["num_hidden_layers"] * (4 * t * d * d + 2 * t * d * i + 2 * t * t * d) + d * 10
    assert zoo.count_flops(vit, torch.zeros(2, 1, 28, 28)) == 2 * macs


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_build_and_show(tmp_path, capsys):
    md = tmp_path / "zoo.md"
    cache = str(tmp_path / "cache")
    assert zoo.main(["build", "--cases", "digits/mlp/iid/K2/tiny", "--cache", cache, "--md", str(md)]) == 0
    text = md.read_text()
    assert "| digits/mlp/iid/K2/tiny | test acc. (%) |" in text
    assert zoo.main(["build", "--list", "--cases", "digits/mlp/iid/K2/tiny,digits/mlp/iid/K3/tiny",
                     "--cache", cache]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "cached   digits/mlp/iid/K2/tiny" in out and "missing  digits/mlp/iid/K3/tiny" in out
    assert zoo.main(["show", "digits/mlp/iid/K2/tiny", "--cache", cache]) == 0
    out = capsys.readouterr().out
    assert "| ensemble (logits) | 2 |" in out and "| vanilla average | 1 |" in out


# ------------------------------------------------------------------------------------------------ text


def test_token_windows_and_char_codec():
    ids = torch.arange(11)
    x, y = pdata.token_windows(ids, 4)
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    x, y = pdata.token_windows(ids, 4, stride=3)
    assert x[:, 0].tolist() == [0, 3, 6] and torch.equal(y, x + 1)
    assert pdata.token_windows(ids[:4], 4)[0].shape == (0, 4)
    vocab = pdata.char_vocab("hello world")
    assert vocab == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert pdata.encode_chars("held", vocab).tolist() == [3, 2, 4, 1]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pdata.encode_chars("help", vocab)
    with pytest.raises(ValueError, match="context"):
        pdata.token_windows(ids, 0)


def test_local_text_corpus(tmp_path):
    (tmp_path / "B").write_text("bee")
    (tmp_path / "A").write_text("ay")
    (tmp_path / "empty").write_text("")
    os.symlink(tmp_path / "A", tmp_path / "C")  # a link (like GPL -> GPL-3) is not read twice
    docs, source = pdata.local_text_corpus(str(tmp_path))
    assert docs == [("A", "ay"), ("B", "bee")] and source == f"licenses:{tmp_path}"
    docs, source = pdata.local_text_corpus(str(tmp_path / "missing"), fallback_chars=5000)
    assert source.startswith("stdlib:") and sum(len(t) for _, t in docs) == 5000
    assert all(name.endswith(".py") for name, _ in docs)


def test_text_case_data_and_reload(tmp_path):
    pytest.importorskip("transformers")
    case = zoo.get_case("text/gpt2/K1/tiny", cache=str(tmp_path))
    info = case.data_info
    assert info["vocab_size"] == len(case.vocab) and info["context"] == 32 and info["n_chars"] > 0
    x, y = case.test
    assert x.shape[1] == 32 and torch.equal(x[:, 1:], y[:, :-1])  # next-token targets
    assert case.metric == "perplexity" and 1.0 < case.member_metrics[0] < len(case.vocab) * 2
    m = case.members[0]
    assert m.lm_head.weight is m.transformer.wte.weight  # tied embeddings survive the cache
    again = zoo.get_case("text/gpt2/K1/tiny", cache=str(tmp_path), train_missing=False).members[0]
    assert again.lm_head.weight is again.transformer.wte.weight and _states_equal(m, again)
    assert case.member_metrics[0] == pytest.approx(lm_perplexity(m, case.loader("test")), rel=1e-12)
    llama = zoo.get_case("text/llama_gqa/K1/tiny", cache=str(tmp_path)).members[0]
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads


# ------------------------------------------------------------------------------------------------ train.py helpers


class _Bigram(nn.Module):
    """A language model whose next-token distribution is row ``x_t`` of a fixed table (logits = log P)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("logp", torch.log(table))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logp[ids]


def test_perplexity_against_a_hand_computed_value():
    table = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    x, y = pdata.token_windows(torch.tensor([0, 1, 1, 2, 0]), 4)
    # Targets 1, 1, 2, 0 after 0, 1, 1, 2: probabilities 0.25, 0.8, 0.1, 1/3.
    want = (0.25 * 0.8 * 0.1 / 3) ** (-1 / 4)
    assert want == pytest.approx(3.4996355, rel=1e-7)
    assert lm_perplexity(_Bigram(table), pdata.make_loader(x, y, 1)) == pytest.approx(want, rel=1e-12)
    assert perplexity(torch.zeros(2, 3, 7), torch.zeros(2, 3, dtype=torch.long)) == pytest.approx(7.0, rel=1e-12)
    with pytest.raises(ValueError, match="targets"):
        perplexity(torch.zeros(2, 3, 7), torch.zeros(2, 4, dtype=torch.long))


def test_as_logits():
    class Out:
        def __init__(self, logits):
            self.logits = logits

    z = torch.ones(2, 3)
    assert as_logits(z) is z and as_logits(Out(z)) is z and as_logits((z, None)) is z
    with pytest.raises(TypeError, match="dict"):
        as_logits({"x": z})


def test_train_language_model_with_cosine_schedule_and_clipping():
    # A repeating sequence: an embedding + linear model learns the bigram and its perplexity falls towards 1.
    ids = torch.tensor([0, 1, 2, 3] * 64)
    x, y = pdata.token_windows(ids, 8, stride=4)

    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(4, 8), nn.Linear(8, 4))
        hist = train(model, pdata.make_loader(x, y, 8, shuffle=True, seed=0), epochs=8, lr=0.05, optimizer="adamw",
                     grad_clip=1.0, lr_schedule="cosine", warmup_steps=3)  # fmt: skip
        return model, hist

    model, hist = run()
    assert hist[-1] < 0.1 * hist[0]
    assert lm_perplexity(model, pdata.make_loader(x, y, 16)) < 1.1
    again, _ = run()
    assert _states_equal(model, again)
    with pytest.raises(ValueError, match="lr_schedule"):
        train(model, [(x, y)], epochs=1, lr=0.1, lr_schedule="step")
    with pytest.raises(ValueError, match="grad_clip"):
        train(model, [(x, y)], epochs=1, lr=0.1, grad_clip=0.0)
    with pytest.raises(ValueError, match="length"):
        train(model, iter([(x, y)]), epochs=1, lr=0.1, lr_schedule="cosine")


def test_threads_are_part_of_the_definition(tmp_path):
    one = zoo.get_case("digits/mlp/iid/K1/tiny", cache=str(tmp_path))
    with pytest.raises(FileNotFoundError):
        zoo.get_case("digits/mlp/iid/K1/tiny", cache=str(tmp_path), threads=2, train_missing=False)
    assert one.records[0]["threads"] == one.records[0]["definition"]["threads"] == 1


def test_best_within_a_budget():
    def r(method, value, flops, metric="accuracy"):
        return zoo.BaselineRow(method, (0,), 1, metric, value, None, flops, 1, flops / 400)

    rows = [r("member 0", 0.99, 100), r("best member (test, oracle)", 0.99, 100),
            r("best member (calibration)", 0.9, 100), r("sub-ensemble best 2/4 (calibration, logits)", 0.95, 200),
            r("vanilla average", 0.95, 100), r("ensemble (logits)", 0.97, 400)]  # fmt: skip
    assert zoo.best_within(rows, 99) is None
    assert zoo.best_within(rows, 150).method == "vanilla average"
    assert zoo.best_within(rows, 250).method == "vanilla average"  # a tie goes to the cheaper row
    assert zoo.best_within(rows, 400).method == "ensemble (logits)"
    assert zoo.best_within(rows, 400, realizable_only=False).method == "member 0"
    lm = [r("best member (calibration)", 4.0, 100, "perplexity"), r("ensemble (logits)", 3.5, 200, "perplexity")]
    assert zoo.best_within(lm, 200).method == "ensemble (logits)"
