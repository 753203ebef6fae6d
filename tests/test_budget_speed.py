"""The budget search's deferred work (pyfusion.fuse.budget._LAZY) changes no decision, count or check.

* The re-trace width check of a build, deferred (:class:`pyfusion.fuse.builder.DeferredWidthCheck`), runs on a
  twin with the model's export fingerprint and gives the same outcome, failures included (Llama's grouped-query
  heads at one slot).
* The search with the deferral and without it (``_LAZY = False``: every build checked at once, every candidate
  scored at once, every count a real forward) chooses the same model with the same candidate rows, objectives and
  fusions; every candidate it compared passed its checks; a check failing late makes the search fall back exactly
  as a build failing at once.
* Every candidate's FLOP count (counted on the meta device where it runs there) equals :func:`pyfusion.cost` of the
  module by a real forward on the search's example; the members' real-forward counts kept by
  :func:`pyfusion.fuse.fast.member_cost_scope` equal a fresh count and are not reused for another example tensor.
"""

from __future__ import annotations

import pytest
import torch

import pyfusion
from pyfusion.fuse import budget as budget_mod
from pyfusion.fuse import builder, fast
from pyfusion.fuse.cost import cost
from pyfusion.graph import trace_groups
from pyfusion.graph.export import fingerprint
from pyfusion.graph.inputs import example_inputs_for
from pyfusion.models import mlp
from tests._ir_models import hf_models


def _members(family: str, k: int = 3) -> list[torch.nn.Module]:
    factory, _ = hf_models()[family]
    out = []
    for s in range(k):
        torch.manual_seed(s)
        out.append(factory().double().eval())
    return out


def _tokens(n: int = 48) -> list[torch.Tensor]:
    return list(torch.randint(0, 100, (n, 6), generator=torch.Generator().manual_seed(0)).split(16))


def _mlp_case() -> tuple[list[torch.nn.Module], list]:
    ms = []
    for s in range(3):
        torch.manual_seed(s)
        ms.append(mlp([12, 16, 16, 5]).double().eval())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (64,), generator=g)
    return ms, list(zip(x.split(16), y.split(16), strict=True))


@pytest.fixture
def deterministic(monkeypatch):
    """The execution modules' measured strategy choice off: outputs bit-identical between runs."""
    monkeypatch.setenv("PYFUSION_PARTIAL_TUNING", "0")


def _search(members, data, budget, lazy: bool, monkeypatch, **options):
    monkeypatch.setattr(budget_mod, "_LAZY", lazy)
    search = budget_mod.budget_search(members, data, **options)
    return search, search.choose(budget)


def _rows(model) -> list[tuple]:
    b = model.fusion_info["budget"]
    return [(r["name"], r["flops"], r["objective"], r["holdout_objective"], r["all_objective"], r["feasible"])
            for r in b["candidates"]]  # fmt: skip


def _assert_same_choice(lazy, eager) -> None:
    bl, be = lazy.fusion_info["budget"], eager.fusion_info["budget"]
    assert bl["chosen"] == be["chosen"]
    assert bl["chosen_objective"] == be["chosen_objective"]
    assert bl["reason"] == be["reason"]
    assert _rows(lazy) == _rows(eager)
    assert bl["fusions"] == be["fusions"]  # the same fusions are built (only checks and scoring are deferred)
    # a failure is recorded with the same message; the eager search also lists checks of candidates over the budget
    assert set(bl["failed"]) <= set(be["failed"])
    assert all(bl["failed"][k] == be["failed"][k] for k in bl["failed"])
    assert lazy.fusion_info.get("effective_flops") == eager.fusion_info.get("effective_flops")


def _assert_ready(search, budget_flops: float) -> None:
    """Every candidate the search could have compared (fits the budget) was checked and scored."""
    for c in search._cache.values():
        if c is not None and c.module is not None and c.flops <= budget_flops and not c.failed:
            assert c.checks == [] or c.checks is None
            assert not c.unscored and not c.uncounted


def test_deferred_check_twin_same_fingerprint_and_outcome():
    members = _members("gpt2")
    data = _tokens()
    graph = trace_groups(members[0], data[0])
    args, kwargs = example_inputs_for(members[0], graph.example_inputs)
    fused = pyfusion.fuse(members, data, method="partial", alpha=0.5, fast_modules=False)
    plan = fused.fusion_plan
    deferred = builder.DeferredWidthCheck(fused, graph, plan)
    twin = deferred.twin()
    assert fingerprint(twin, args, kwargs) == fingerprint(fused, args, kwargs)
    assert not any(t.is_meta for t in twin.parameters())
    builder.check_fused_widths(twin, graph, plan)  # passes, as on the model itself
    builder.check_fused_widths(fused, graph, plan)
    with pytest.raises(RuntimeError, match="already run"):
        deferred.run()


class _HardCodedView(torch.nn.Module):
    """A user layer whose forward splits its 16 features into a hard-coded 2 heads (``view(B, 2, -1)``, a softmax
    per head of 8): a fused width of 8 (one head) or 24 (three) runs, but as heads of 4 or 12, so the width check
    fails. (Llama at narrow cluster widths used to be this case -- its k / v group at one slot was no group -- until
    one-head heads became units of size 1. The one-head case here was let through, silently wrong, before.)"""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(12, 16), torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h.view(h.shape[0], 2, -1).softmax(-1).flatten(1))


def _hard_coded_case(k: int = 3) -> tuple[list[torch.nn.Module], list]:
    ms = []
    for s in range(k):
        torch.manual_seed(s)
        ms.append(_HardCodedView().double().eval())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (64,), generator=g)
    return ms, list(zip(x.split(16), y.split(16), strict=True))


def test_deferred_check_fails_as_the_immediate_check():
    members, data = _hard_coded_case()
    with pytest.raises(ValueError) as eager:
        pyfusion.fuse(members, data, method="cluster", width=0.5, n_restarts=1)
    with builder.deferred_width_checks() as checks:
        fused = pyfusion.fuse(members, data, method="cluster", width=0.5, n_restarts=1)  # the check waits
    assert len(checks) == 1 and fused is not None
    with pytest.raises(ValueError) as late:
        checks[0].run()
    assert str(late.value) == str(eager.value)
    assert "the plan gives it 8 slots in units of 8, but the fused model traces to 8 neurons in units of 4" in str(
        late.value
    )


@pytest.mark.parametrize("budget", [0.4, 1.0])
def test_mlp_search_lazy_equals_eager(budget, monkeypatch, deterministic):
    ms, data = _mlp_case()
    s_lazy, lazy = _search(ms, data, budget, True, monkeypatch)
    _s_eager, eager = _search(ms, data, budget, False, monkeypatch)
    _assert_same_choice(lazy, eager)
    _assert_ready(s_lazy, lazy.fusion_info["budget"]["budget_flops"])
    assert s_lazy._meta_counts is True  # an nn.Sequential counts on the meta device


def test_search_lazy_equals_eager_with_check_failures(monkeypatch, deterministic):
    """A model whose cluster widths but one fail the width check: the same first buildable width, the same
    failures, the same choice."""
    ms, data = _hard_coded_case(2)
    opts = {"candidates": ["members", "cluster"], "cluster_restarts": 1}
    s_lazy, lazy = _search(ms, data, 1.0, True, monkeypatch, **opts)
    _s_eager, eager = _search(ms, data, 1.0, False, monkeypatch, **opts)
    _assert_same_choice(lazy, eager)
    assert s_lazy.cheapest() == _s_eager.cheapest()
    failed = lazy.fusion_info["budget"]["failed"]
    assert any("cluster width" in k for k in failed)
    # widths under one head give no slot; from one head (8 of 32 neurons) up to 16 they fail the width check
    checks = [k for k, v in failed.items() if "cluster width" in k and "but the fused model traces to" in v]
    none = [k for k, v in failed.items() if "cluster width" in k and "slots; got 0" in v]
    assert len(checks) >= 1 and len(checks) + len(none) == sum("cluster width" in k for k in failed)
    _assert_ready(s_lazy, lazy.fusion_info["budget"]["budget_flops"])


def test_late_check_failure_falls_back_like_an_immediate_one(monkeypatch, deterministic):
    """Every width check failing: the lazy search drops the same candidates and returns the same trivial one."""
    ms, data = _members("gpt2"), _tokens()

    def fail(fused, graph, plan):
        raise ValueError("group 'x': forced failure")

    monkeypatch.setattr(builder, "check_fused_widths", fail)
    opts = {"candidates": ["members", "subsets", "partial"]}
    s_lazy, lazy = _search(ms, data, 0.7, True, monkeypatch, **opts)
    _s_eager, eager = _search(ms, data, 0.7, False, monkeypatch, **opts)
    _assert_same_choice(lazy, eager)
    assert lazy.fusion_info["budget"]["chosen_family"] in ("members", "subsets")
    assert lazy.fusion_info["budget"]["failed"]["partial alpha=0"] == "ValueError: group 'x': forced failure"


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_candidate_counts_equal_real_forward(family, monkeypatch, deterministic):
    """Each candidate's FLOPs (meta-device count where the model runs there) = pyfusion.cost by a real forward."""
    ms, data = _members(family), _tokens(32)
    search, _model = _search(ms, data, 0.5, True, monkeypatch, candidates=["members", "partial"])
    cands = [c for c in search._cache.values() if c is not None and c.module is not None]
    assert len(cands) >= 3
    for c in cands:
        assert c.flops == int(cost(c.module, search.example).flops), c.name
    assert search._meta_counts is (family == "bert")


def test_member_cost_scope_reuses_only_the_same_example():
    ms, data = _members("gpt2", 2), _tokens()
    example = data[0]
    fresh = [cost(m, example) for m in ms]
    calls = []
    real = fast._cost

    def counting(model, ex, shapes=None, meta_flag=None):
        calls.append(model)
        return real(model, ex, shapes, meta_flag=meta_flag)

    with fast.member_cost_scope() as record:
        fast._cost = counting
        try:
            first = fast._member_costs(ms, example)
            again = fast._member_costs(ms, example)
            n_same = len(calls)
            other = example.clone()  # equal values, another tensor: not reused
            fast._member_costs(ms, other)
            n_other = len(calls)
            example.add_(0)  # an in-place write (version bump): not reused
            fast._member_costs(ms, example)
        finally:
            fast._cost = real
    assert [c.flops for c in first] == [c.flops for c in again] == [c.flops for c in fresh]
    assert first == fresh
    assert n_same == 1  # one structure, counted once, then reused
    assert n_other == 2 and len(calls) == 3
    assert record  # the real-forward count was kept
