"""Budgets that move between layer groups (``budget_alloc = "shared"``): the allocation's invariants,
for every policy; batch invariance; state round trip; fused kernels == torch reference; the knob on
the wire."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nexus_sidecar.engine import POLICIES, Engine, PolicyConfig, SessionState
from nexus_sidecar.engine.budget_alloc import allocate
from nexus_sidecar.engine.errors import ConfigError

from tests.engine.streams import Stream, evicted_lists, run_checked, step_together

ALL_POLICIES = sorted(POLICIES)


def _cfg(policy: str = "nexus", **kw: object) -> PolicyConfig:
    base = dict(policy=policy, budget=12, sinks=2, recent=3, groups=3, fanout=4, seed=5, tau=2.0,
                budget_alloc="shared", budget_floor=0.5)  # fmt: skip
    return PolicyConfig(**{**base, **kw}).validate()  # type: ignore[arg-type]


def test_allocation_follows_the_weight_and_keeps_floors_and_protected_slots() -> None:
    # Session of 3 groups x 10 slots, budget 4 per group (12 in all); slot 0 protected in each row.
    W = 10
    cand = torch.ones(3, W, dtype=torch.bool)
    cand[:, 0] = False
    weight = torch.zeros(3, W)
    weight[0, 1:3] = 1.0  # group 0: all its mass on two slots
    weight[1, 1:] = 1.0  # group 1: flat over nine
    weight[2, 1:] = torch.linspace(1.0, 2.0, 9)  # group 2: flat-ish
    n = torch.full((3,), W)
    budget, slack, group = torch.full((3,), 4), torch.zeros(3, dtype=torch.int64), torch.arange(3)
    alloc = allocate(weight, cand, n, budget, slack, group, floor=0.5)
    assert int(alloc.sum()) == 12
    assert alloc[0] == 3  # protected + its two heavy slots (each holds half its group's mass)
    assert all(a >= 2 for a in alloc.tolist())  # floor ceil(0.5 * 4) = 2, the protected slot counted
    # Floor 1.0: every group keeps its own budget, as with fixed budgets.
    assert allocate(weight, cand, n, budget, slack, group, floor=1.0).tolist() == [4, 4, 4]
    # Under the session budget + slack: nothing moves, whatever one group holds.
    few = torch.tensor([10, 1, 1])
    assert allocate(weight, cand, few, budget, slack, group, floor=0.5).tolist() == [10, 1, 1]
    # Two sessions in one batch are allocated independently (rows tied by their group index).
    two = allocate(torch.cat([weight, weight]), torch.cat([cand, cand]), torch.cat([n, n]),
                   torch.cat([budget, budget]), torch.cat([slack, slack]), torch.cat([group, group]), 0.5)  # fmt: skip
    assert two.tolist() == alloc.tolist() * 2


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_invariants_for_every_policy(policy: str) -> None:
    s = Stream.open(Engine("cpu"), _cfg(policy), data_seed=3, prefill=30, k_range=(1, 6))
    history, spread = [], set()
    for _ in range(30):
        history += run_checked(s, 1)  # check_call + check_shared_budget on every call
        spread.add(tuple(int(p.numel()) for p in s.engine.positions(s.handle)))
    assert any(any(e) for e in history)
    assert any(len(set(c)) > 1 for c in spread), f"budgets never moved between groups: {spread}"


@pytest.mark.parametrize("policy", ["nexus", "tova", "keydiff"])
def test_one_group_shared_is_fixed(policy: str) -> None:
    runs = []
    for alloc in ("fixed", "shared"):
        s = Stream.open(Engine("cpu"), _cfg(policy, groups=1, budget_alloc=alloc), data_seed=9, prefill=20)
        runs.append(run_checked(s, 20))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kernels", ["torch", "fused"])
def test_batch_invariance(kernels: str) -> None:
    """A session's evictions do not depend on the sessions batched with it (other budgets, groups,
    widths and floors' worth of padding)."""
    alone_eng = Engine("cpu", kernels=kernels)
    alone = Stream.open(alone_eng, _cfg(), data_seed=11, prefill=25, k_range=(1, 5))
    ref = [evicted_lists(alone.step()[1]) for _ in range(20)]
    eng = Engine("cpu", kernels=kernels)
    streams = [Stream.open(eng, _cfg(budget=20, groups=2, seed=1), data_seed=12, prefill=40, k_range=(1, 7)),
               Stream.open(eng, _cfg(), data_seed=11, prefill=25, k_range=(1, 5)),
               Stream.open(eng, _cfg(groups=4, budget=8), data_seed=13, prefill=3, k_range=(2, 3))]  # fmt: skip
    got = []
    for _ in range(20):
        res = step_together(streams)
        got.append(evicted_lists(res[1][1]))
    assert got == ref


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_fused_equals_torch(policy: str) -> None:
    a = Stream.open(Engine("cpu", kernels="torch"), _cfg(policy), data_seed=21, prefill=30, k_range=(1, 6))
    b = Stream.open(Engine("cpu", kernels="fused"), _cfg(policy), data_seed=21, prefill=30, k_range=(1, 6))
    assert b.engine.kernels == "fused"
    for _ in range(25):
        (ia, oa), (ib, ob) = a.step(), b.step()
        assert torch.equal(ia.new_positions, ib.new_positions)
        assert evicted_lists(oa) == evicted_lists(ob) and torch.equal(oa.keep, ob.keep)
    assert [p.tolist() for p in a.engine.positions(a.handle)] == [p.tolist() for p in b.engine.positions(b.handle)]


def test_state_round_trip_and_restore_continues_identically() -> None:
    original = Stream.open(Engine("cpu"), _cfg(randomness="fixed"), data_seed=31, prefill=30, k_range=(1, 5))
    run_checked(original, 10)
    blob = original.engine.snapshot(original.handle).to_bytes()
    back = SessionState.from_bytes(blob)
    assert back.to_bytes() == blob
    assert (back.config.budget_alloc, back.config.budget_floor) == ("shared", 0.5)
    other = Engine("cpu")
    h = other.restore(back)
    clone = Stream(other, h, original.cfg, np.random.default_rng(0), k_range=original.k_range)
    clone.next_pos, clone.calls, clone.first_positions = original.next_pos, original.calls, original.first_positions
    clone.rng = type(original.rng)(type(original.rng.bit_generator)())
    clone.rng.bit_generator.state = original.rng.bit_generator.state
    assert run_checked(original, 15) == run_checked(clone, 15)
    assert original.engine.snapshot(original.handle).to_bytes() == other.snapshot(h).to_bytes()


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="budget_alloc"):
        _cfg(budget_alloc="adaptive")
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ConfigError, match="budget_floor"):
            _cfg(budget_floor=bad)
    # A blob written before the knob existed restores as fixed per-group budgets.
    assert PolicyConfig.from_stored({"policy": "tova", "budget": 32}).budget_alloc == "fixed"
    # Structural: sessions with different allocations never share a batched call.
    assert _cfg().batch_key() != _cfg(budget_alloc="fixed").batch_key()


def test_the_knob_crosses_the_wire() -> None:
    from nexus_client.client import config_message
    from nexus_sidecar.server.codec import config_from_proto, config_to_proto

    msg = config_message({"policy": "snapkv", "budget": 32, "groups": 3, "budget_alloc": "shared",
                          "budget_floor": 0.3})  # fmt: skip
    cfg = config_from_proto(msg, "nexus")
    assert (cfg.budget_alloc, cfg.budget_floor, cfg.groups) == ("shared", 0.3, 3)
    assert config_from_proto(config_to_proto(cfg), "nexus") == cfg
    unset = config_from_proto(config_message({"policy": "tova", "budget": 32}), "nexus")
    assert (unset.budget_alloc, unset.budget_floor) == ("fixed", 0.25)
