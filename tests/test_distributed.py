"""``pyfusion.fuse`` on several processes (issue 15 item 5): 2 gloo ranks, each with its own calibration shard,
against one process on the union of the shards.

The ranks run in spawned processes (torch.multiprocessing, a free TCP port); the process group has a 60 s timeout
and the test joins the processes with a deadline, so a hang in a collective fails the test instead of blocking CI.
Every rank writes its fused state dicts (or the error it raised) to a file; the test compares them with the one-process
results: float64 members, so the statistics agree to float64 rounding and the fused networks to ~1e-12.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable

import pytest
import torch
import torch.multiprocessing as mp

import pyfusion
from pyfusion.models import mlp, vgg
from pyfusion.stats.distributed import DistributedMismatchError

WORLD = 2
JOIN_TIMEOUT_S = 240.0  # both ranks import torch + pyfusion and run every case; ~10 s idle on the 2-core VM


def _members_mlp() -> list[torch.nn.Module]:
    out = []
    for k in range(2):
        torch.manual_seed(10 + k)
        out.append(mlp([12, 16, 16, 5]).double())
    return out


def _members_bn() -> list[torch.nn.Module]:
    out = []
    for k in range(2):
        torch.manual_seed(20 + k)
        m = vgg((4, "M", 6), in_channels=1, num_classes=3, image_size=8, hidden=8).double()
        m.train()
        with torch.no_grad():  # running statistics that are not the data's (trained elsewhere)
            m(torch.randn(16, 1, 8, 8, dtype=torch.float64) * 1.5 + 0.3)
        m.eval()
        out.append(m)
    return out


def _shards(kind: str) -> list[list[torch.Tensor]]:
    """Rank r's batches; the one-process run sees their concatenation. Batches of unequal sizes, and shards with
    different means (the reduction must not assume identically distributed ranks)."""
    g = torch.Generator().manual_seed(7)
    shape = (12,) if kind == "mlp" else (1, 8, 8)
    sizes = [[24, 16], [20, 12, 8]]
    return [
        [torch.randn(n, *shape, generator=g, dtype=torch.float64) + 0.5 * r for n in sizes[r]] for r in range(WORLD)
    ]


# name -> (members, data kind, fuse keyword arguments)
CASES: dict[str, tuple[Callable[[], list[torch.nn.Module]], str, dict]] = {
    "activation_matching": (_members_mlp, "mlp", {"method": "activation_matching"}),
    "partial": (_members_mlp, "mlp", {"method": "partial", "alpha": 0.5}),
    "ot": (_members_mlp, "mlp", {"method": "ot"}),
    "cluster": (_members_mlp, "mlp", {"method": "cluster", "alpha": 0.5, "n_restarts": 4}),
    "repair": (_members_mlp, "mlp", {"method": "activation_matching", "repair": True}),
    "bn_changed": (_members_bn, "bn", {"method": "activation_matching", "reset_bn": True}),
    "bn_all": (_members_bn, "bn", {"method": "partial", "alpha": 0.5, "reset_bn": "all"}),
}


def _run_case(name: str, data: list[torch.Tensor]) -> dict:
    make, _, kwargs = CASES[name]
    fused = pyfusion.fuse(make(), data, fast_modules=False, **kwargs)
    info = fused.fusion_info
    return {
        "state": {k: v.detach().clone() for k, v in fused.state_dict().items()},
        "bn_samples": info.get("bn_reset_samples"),
        "stat_rows": info.get("stat_rows"),
        "distributed": info.get("distributed"),
        "repair": info.get("repair"),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    results: dict = {}
    try:
        for name, (_, kind, _) in CASES.items():
            results[name] = _run_case(name, _shards(kind)[rank])
        members = _members_mlp()
        data = _shards("mlp")[rank]
        for key, call in {
            # rank-dependent options: every rank must raise, none may wait in a collective
            "mismatch": lambda: pyfusion.fuse(members, data, method="partial", alpha=0.25 + 0.5 * rank),
            # a rank whose shard makes the statistics fail (non-finite activations): every rank raises
            "nan_shard": lambda: pyfusion.fuse(
                members, [d * float("nan") if rank == 1 else d for d in data], method="activation_matching"
            ),
            "interp": lambda: pyfusion.fuse(members, data, method="hf"),
        }.items():
            try:
                call()
                results[key] = "no error"
            except Exception as exc:  # recorded for the test to check
                results[key] = f"{type(exc).__name__}: {exc}"
        # opt-out: each rank fuses its own shard alone (no collective, so the ranks may differ)
        alone = pyfusion.fuse(members, data, method="activation_matching", distributed=False)
        results["alone"] = {k: v.detach().clone() for k, v in alone.state_dict().items()}
        results["alone_info"] = alone.fusion_info.get("distributed")
    except Exception:
        results["crash"] = traceback.format_exc()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} distributed ranks did not finish within {JOIN_TIMEOUT_S} s (hang?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    res = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    for r, rr in enumerate(res):
        assert "crash" not in rr, f"rank {r} crashed:\n{rr['crash']}"
    return res


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_equal_one_process_on_union(ranks, name):
    _, kind, _ = CASES[name]
    shards = _shards(kind)
    one = _run_case(name, [b for shard in shards for b in shard])
    assert one["distributed"] is None
    for r in range(WORLD):
        got = ranks[r][name]
        assert got["distributed"]["world_size"] == WORLD and got["distributed"]["rank"] == r
        assert got["state"].keys() == one["state"].keys()
        for key, want in one["state"].items():
            have = got["state"][key]
            assert have.shape == want.shape, (name, key)
            if want.is_floating_point():
                torch.testing.assert_close(have, want, rtol=1e-10, atol=1e-12, msg=f"{name}: {key} on rank {r}")
            else:
                assert torch.equal(have, want), (name, key)
            assert torch.equal(have, ranks[0][name]["state"][key]), f"{name}: {key} differs between ranks"
        assert got["stat_rows"] == one["stat_rows"]
        assert got["bn_samples"] == one["bn_samples"]
        if one["repair"] is not None:  # one process: one pass of all samples; ranks: a pass per group
            assert one["repair"]["passes"] == 1 and got["repair"]["repaired"] == one["repair"]["repaired"]
            assert got["repair"]["passes"] == len(got["repair"]["repaired"]) > 1
            assert got["repair"]["one_pass_refused"] == "several processes (torch.distributed)"


def test_union_differs_from_each_shard(ranks):
    """The comparison above has teeth: a rank's own shard alone (distributed=False) gives another network."""
    shards = _shards("mlp")
    for r in range(WORLD):
        assert ranks[r]["alone_info"] is None
        alone = ranks[r]["alone"]
        assert alone.keys() == ranks[r]["activation_matching"]["state"].keys()
        one_shard = _run_case("activation_matching", shards[r])["state"]
        for key in alone:
            torch.testing.assert_close(alone[key], one_shard[key], rtol=1e-10, atol=1e-12)
    union = ranks[0]["activation_matching"]["state"]
    assert any(not torch.allclose(ranks[r]["alone"][k], union[k]) for r in range(WORLD) for k in union), (
        "the shards' own fusions equal the union's: the data does not discriminate"
    )


def test_every_rank_raises_together(ranks):
    for r in range(WORLD):
        assert ranks[r]["mismatch"].startswith(DistributedMismatchError.__name__), ranks[r]["mismatch"]
        assert "must agree on" in ranks[r]["mismatch"]
        assert ranks[r]["interp"].startswith("NotImplementedError") and "'hf'" in ranks[r]["interp"]
    assert ranks[1]["nan_shard"].startswith("ValueError") and "NaN" in ranks[1]["nan_shard"]
    assert ranks[0]["nan_shard"].startswith(DistributedMismatchError.__name__)
    assert "rank(s) [1]" in ranks[0]["nan_shard"]
