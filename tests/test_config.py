"""Method configs (pyfusion.fuse.config) and the keyword shim of pyfusion.fuse: one frozen dataclass per method,
checked when made, equivalent to the keyword options, and registered with its method."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import pyfusion
from pyfusion.fuse import config as C
from pyfusion.fuse.registry import available_methods, get_method, method_for_config
from pyfusion.models import mlp

# The options and defaults every method had before configs existed (its keyword signature); a config must keep them.
DEFAULTS = {
    "average": {},
    "weight_matching": {"seed": 0, "max_iter": 100, "max_rounds": 20, "starts": ("identity", "sorted_rows")},
    "activation_matching": {"cost": "correlation", "point": "post", "reference": 0, "max_batches": None},
    "ot": {"cost": None, "masses": "uniform", "point": "post", "reference": 0, "max_batches": None, "reg": None,
           "max_iter": 10_000, "tol": 1e-9},  # fmt: skip
    "partial": {
        "alpha": 0.5, "features": None, "cost": None, "point": "pre", "reference": 0, "sweeps": 10,
        "max_batches": None,
    },
    "cluster": {
        "width": None, "alpha": None, "n_restarts": 200, "seed": 0, "point": "pre", "top_k": 5, "max_batches": None,
        "num_threads": None,
    },
    "prune": {"width": None, "alpha": None, "criterion": "weight_norm", "point": "post", "max_batches": None},
}  # fmt: skip
INTERP_DEFAULTS = {
    "importance": "uniform", "n_steps": 10, "ridge": 1e-6, "stats_dtype": "float32", "cost": "l2", "n_restarts": 10,
    "init": "ward", "seed": 0, "max_samples": None, "class_weights": None, "epochs": 30, "last_epochs": 50,
    "lr": 1e-3, "optimizer": "adam", "batch_size": 32, "patience": 5, "val_fraction": 0.2, "weight_decay": 0.0,
    "level_init": "member0",
}  # fmt: skip
for _m in ("hf", "kf", "kf_gradient"):
    DEFAULTS[_m] = INTERP_DEFAULTS
DEFAULTS["partial_fit"] = {**DEFAULTS["partial"], "ridge": 1e-2, "max_samples": 2048, "fit_output": True,
                           "output_target": "logits"}  # fmt: skip
DEFAULTS["cluster_fit"] = {**DEFAULTS["cluster"], "ridge": 1e-2, "max_samples": 2048, "fit_output": True,
                           "output_target": "logits"}  # fmt: skip


def _members(k: int = 2) -> list[torch.nn.Module]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(mlp([6, 8, 8, 3]).double())
    return out


@pytest.mark.parametrize("method", sorted(DEFAULTS))
def test_every_method_has_a_config_with_the_old_options_and_defaults(method):
    spec = get_method(method)
    assert spec.config is not None and dataclasses.is_dataclass(spec.config)
    fields = {f.name: f.default for f in dataclasses.fields(spec.config)}
    assert fields == DEFAULTS[method]
    # the keyword entry point advertises exactly these options (the CLI reads them from the signature)
    sig = inspect.signature(spec.fn)
    kw = {p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert kw == {**DEFAULTS[method], "config": None}
    needs_width = method in ("cluster", "prune", "cluster_fit")
    assert method_for_config(spec.config(width=3) if needs_width else spec.config()) is spec


def test_all_builtin_methods_are_covered():
    assert set(available_methods()) == set(DEFAULTS)


def test_configs_are_frozen():
    cfg = C.PartialConfig(alpha=0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.alpha = 0.5  # type: ignore[misc]
    assert dataclasses.replace(cfg, sweeps=3) == C.PartialConfig(alpha=0.25, sweeps=3)


BAD = [
    (C.PartialConfig, {"alpha": 1.5}, r"PartialConfig\.alpha must be in \[0, 1\]; got 1.5"),
    (C.PartialConfig, {"alpha": [0.2, -1.0]}, r"PartialConfig\.alpha\[1\] must be in \[0, 1\]; got -1.0"),
    (C.PartialConfig, {"alpha": {"g": "x"}}, r"PartialConfig\.alpha\['g'\] must be a float"),
    (C.PartialConfig, {"features": "grads"}, r"PartialConfig\.features must be one of .*'pcd'.* or None; got 'grads'"),
    (C.PartialConfig, {"sweeps": 0}, r"PartialConfig\.sweeps must be an integer >= 1; got 0"),
    (C.PartialConfig, {"reference": -1}, r"PartialConfig\.reference must be an integer >= 0; got -1"),
    (C.PartialConfig, {"reference": True}, r"PartialConfig\.reference must be an integer >= 0; got True"),
    (C.PartialConfig, {"point": "mid"}, r"PartialConfig\.point must be one of \('post', 'pre'\); got 'mid'"),
    (C.ActivationMatchingConfig, {"cost": "cosine"}, r"ActivationMatchingConfig\.cost must be one of"),
    (C.ActivationMatchingConfig, {"max_batches": -1}, r"max_batches must be an integer >= 0 or None; got -1"),
    (C.OTConfig, {"masses": "l3"}, r"OTConfig\.masses must be 'uniform', 'l1', 'l2' or a dict"),
    (C.OTConfig, {"cost": "l2"}, r"OTConfig\.cost must be one of \('activations', 'correlation', 'weights'\)"),
    (C.WeightMatchingConfig, {"seed": 1.5}, r"WeightMatchingConfig\.seed must be an integer >= 0; got 1.5"),
    (C.WeightMatchingConfig, {"starts": ()}, r"WeightMatchingConfig\.starts must be a non-empty tuple of distinct"),
    (C.WeightMatchingConfig, {"starts": ("identity", "random")}, r"from \('identity', 'sorted_rows'\); got"),
    (C.WeightMatchingConfig, {"starts": ("identity", "identity")}, r"starts must be a non-empty tuple of distinct"),
    (C.WeightMatchingConfig, {"starts": "identity"}, r"WeightMatchingConfig\.starts must be a non-empty tuple"),
    (C.ClusterConfig, {}, r"ClusterConfig: give exactly one of width="),
    (C.ClusterConfig, {"width": 3, "alpha": 0.5}, r"give exactly one of width="),
    (C.ClusterConfig, {"width": 0}, r"ClusterConfig\.width must be an int >= 1"),
    (C.ClusterConfig, {"width": float("nan")}, r"ClusterConfig\.width must be an int >= 1 .*; got nan"),
    (C.ClusterConfig, {"width": 4, "n_restarts": 0}, r"ClusterConfig\.n_restarts must be an integer >= 1; got 0"),
    (C.PruneConfig, {"width": 4, "criterion": "random"}, r"PruneConfig\.criterion must be one of"),
    (C.HFConfig, {"importance": "deeplift"}, r"HFConfig\.importance must be one of"),
    (C.KFConfig, {"ridge": -1.0}, r"KFConfig\.ridge must be a finite number >= 0.0; got -1.0"),
    (C.KFConfig, {"stats_dtype": "float16"}, r"KFConfig\.stats_dtype must be 'float32' or 'float64'"),
    (C.KFGradientConfig, {"val_fraction": 1.0}, r"val_fraction must be a finite number >= 0.0 and < 1.0; got 1.0"),
    (C.KFGradientConfig, {"class_weights": [1.0, 2.0]}, r"class_weights must be a non-negative finite \(K, C\)"),
    (C.KFGradientConfig, {"optimizer": "lbfgs"}, r"KFGradientConfig\.optimizer must be one of \('adam', 'sgd'\)"),
]


@pytest.mark.parametrize("cls,kwargs,msg", BAD, ids=[f"{c.__name__}-{sorted(k)}" for c, k, _ in BAD])
def test_bad_values_raise_naming_the_field_expected_and_actual(cls, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        cls(**kwargs)


def test_valid_edge_values_are_accepted():
    C.PartialConfig(alpha=torch.tensor(0.3))  # a 0-d float tensor
    C.PartialConfig(alpha=[0.0, 1.0], sweeps=2.0)  # an integral float is an integer
    C.ClusterConfig(width={"g": 3, "h": 0.5})
    C.KFGradientConfig(stats_dtype=torch.float64, class_weights=torch.ones(2, 3), epochs=0, lr=0.0)
    C.WeightMatchingConfig(max_iter=0)  # 0 sweeps was allowed before (the identity alignment)


def test_config_and_keywords_give_the_same_fusion():
    members = _members()
    data = [torch.randn(16, 6, dtype=torch.float64)]
    x = torch.randn(5, 6, dtype=torch.float64)
    kw = pyfusion.fuse(members, data, method="partial", alpha=0.4, features="pcd", sweeps=3)
    cfg = pyfusion.fuse(members, data, config=C.PartialConfig(alpha=0.4, features="pcd", sweeps=3))
    both = pyfusion.fuse(members, data, method="partial", config=C.PartialConfig(alpha=0.9, features="pcd"), alpha=0.4,
                         sweeps=3)  # fmt: skip
    for other in (cfg, both):
        assert other.fusion_layouts == kw.fusion_layouts
        torch.testing.assert_close(other(x), kw(x), rtol=0, atol=0)
    # the plan function takes the same config (and the same keywords)
    graph = pyfusion.graph.trace_groups(members[0])
    p1 = pyfusion.fuse.partial_plan(members, graph, (0.5, 0.5), data, config=C.PartialConfig(alpha=0.4))
    p2 = pyfusion.fuse.partial_plan(members, graph, (0.5, 0.5), data, alpha=0.4)
    for name in p1.groups:
        for a, b in zip(p1.groups[name].A + p1.groups[name].B, p2.groups[name].A + p2.groups[name].B):
            assert torch.equal(a, b)


def test_unknown_options_name_the_option_and_list_the_fields():
    members = _members()
    fields = "alpha, features, cost, point, reference, sweeps, max_batches"
    msg = rf"method 'partial' has no option 'alfa'; its options \(PartialConfig fields\) are: {fields}"
    with pytest.raises(C.UnknownOptionError, match=msg) as e:
        pyfusion.fuse(members, method="partial", alfa=0.5)
    assert isinstance(e.value, ValueError) and isinstance(e.value, TypeError)  # was a TypeError before configs
    assert e.value.options == ["alfa"] and "alpha" in e.value.fields
    with pytest.raises(C.UnknownOptionError, match=r"method 'average' takes no options; got \['bogus'\]"):
        pyfusion.fuse(members, method="average", bogus=1)
    with pytest.raises(C.UnknownOptionError, match="has no option 'nope'"):
        pyfusion.fuse.weight_matching_plan(members, pyfusion.graph.trace_groups(members[0]), (0.5, 0.5), nope=1)


def test_method_and_config_must_agree():
    members = _members()
    with pytest.raises(ValueError, match=r"method 'kf' takes KFConfig; got config=HFConfig"):
        pyfusion.fuse(members, [torch.randn(8, 6, dtype=torch.float64)], method="kf", config=C.HFConfig())
    with pytest.raises(ValueError, match=r"no fusion method takes a InterpConfig; the method configs are: .*HFConfig"):
        pyfusion.fuse(members, [torch.randn(8, 6, dtype=torch.float64)], config=C.InterpConfig())
    with pytest.raises(ValueError, match=r"needs method= .* or config="):
        pyfusion.fuse(members)
    with pytest.raises(ValueError, match=r"config must be a method config"):
        pyfusion.fuse(members, config={"alpha": 0.5})


def test_config_errors_come_before_any_work_and_change_nothing():
    members = _members()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    with pytest.raises(ValueError, match=r"PartialConfig\.sweeps"):
        pyfusion.fuse(members, method="partial", sweeps=-1)
    for m, s in zip(members, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, s[k])


def test_custom_method_without_config_still_takes_keywords():
    from pyfusion.fuse import Plan, register_method
    from pyfusion.fuse.registry import _METHODS

    seen = {}

    @register_method("_test_kwargs", needs_data="no")
    def _fn(members, graph, lambdas, data, **opts):
        seen.update(opts)
        return Plan.identity(graph, lambdas)

    try:
        pyfusion.fuse(_members(), method="_test_kwargs", anything=3)
        assert seen == {"anything": 3}
        with pytest.raises(ValueError, match="has no config class"):
            pyfusion.fuse(_members(), method="_test_kwargs", config=C.AverageConfig())
    finally:
        _METHODS.pop("_test_kwargs", None)
