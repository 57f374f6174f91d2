"""Engine-level behaviour: batch invariance, input validation and isolation, lifecycle, CUDA parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nexus_sidecar.engine import POLICIES, Engine, InputError, PolicyConfig, StepInput, StepOutput

from tests.engine.streams import Stream, evicted_lists, random_input, run_checked, step_together

ALL_POLICIES = sorted(POLICIES)


# -- batch invariance -------------------------------------------------------------------------------
def _target_cfg(policy: str, recent: int) -> PolicyConfig:
    return PolicyConfig(policy=policy, budget=14, slack=0, sinks=2, recent=recent, groups=2, fanout=4, seed=99,
                        tau=2.0, pool=3).validate()


def _others(policy: str) -> list[tuple[PolicyConfig, dict]]:
    """Sessions of the same batch key (so they share the batched kernels) but other per-session values,
    and old clients (no priors) in the same engine call."""
    old_client = [] if POLICIES[policy].requires else [
        (PolicyConfig(policy=policy, budget=12, sinks=1, recent=2, groups=2, fanout=4, seed=3, tau=2.0, pool=3),
         {"k_range": (1, 4), "prefill": 10, "priors": False})]
    return [*old_client,
        (PolicyConfig(policy=policy, budget=40, slack=3, sinks=0, recent=5, groups=1, fanout=4, seed=1,
                      tau=2.0, pool=3), {"k_range": (4, 9), "prefill": 60}),
        (PolicyConfig(policy=policy, budget=8, slack=0, sinks=4, recent=1, groups=3, fanout=4, seed=-5,
                      tau=2.0, pool=3), {"k_range": (1, 2), "prefill": 3}),
        # A different policy in the same Engine.step call (another batch) must not matter either.
        (PolicyConfig(policy="tova" if policy != "tova" else "h2o", budget=10, sinks=1, recent=1, fanout=4),
         {"k_range": (1, 3), "priors": False}),
    ]


@pytest.mark.parametrize(("recent", "priors"), [(0, True), (4, True), (4, False)])
@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_batch_invariance(policy: str, recent: int, priors: bool) -> None:
    if not priors and POLICIES[policy].requires:
        pytest.skip("the policy refuses steps without its prior")
    calls = 30
    cfg = _target_cfg(policy, recent)
    kw = {"k_range": (1, 4), "prefill": 20, "priors": priors}

    alone = Stream.open(Engine("cpu"), cfg, data_seed=42, **kw)
    solo_hist, solo_snaps = [], []
    for _ in range(calls):
        solo_hist.append(evicted_lists(alone.step()[1]))
        solo_snaps.append(alone.engine.snapshot(alone.handle).to_bytes())

    eng = Engine("cpu")
    # Others opened first, so the target's rows sit in the middle of the pool and the batch.
    others = [Stream.open(eng, c.validate(), data_seed=7 + i, **k) for i, (c, k) in enumerate(_others(policy))]
    target = Stream.open(eng, cfg, data_seed=42, **kw)
    batch = [others[0], target, *others[1:]]
    for t in range(calls):
        results = step_together(batch)
        assert evicted_lists(results[1][1]) == solo_hist[t], f"call {t}: evictions depend on the batch"
        assert eng.snapshot(target.handle).to_bytes() == solo_snaps[t], f"call {t}: state depends on the batch"
    assert any(any(e) for e in solo_hist), "the stream must evict"


def test_batch_invariance_keep_mask_and_outputs() -> None:
    cfg = _target_cfg("nexus", 2)
    a = Stream.open(Engine("cpu"), cfg, data_seed=3, prefill=30)
    eng = Engine("cpu")
    other = Stream.open(eng, cfg.with_(budget=50, seed=4), data_seed=4, prefill=80, k_range=(5, 9))
    b = Stream.open(eng, cfg, data_seed=3, prefill=30)
    for _ in range(10):
        _, out_a = a.step()
        out_b = step_together([other, b])[1][1]
        assert torch.equal(out_a.keep, out_b.keep)
        assert torch.equal(out_a.slot_positions, out_b.slot_positions)
        assert torch.equal(out_a.retained_mass, out_b.retained_mass)
        assert torch.equal(out_a.evicted_age, out_b.evicted_age)


# -- streams with holes and offsets -----------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["token", "block"])
@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_positions_with_holes_between_calls(policy: str, granularity: str) -> None:
    # Positions must ascend, not be contiguous: a worker may skip positions between calls.
    cfg = PolicyConfig(policy=policy, budget=24, sinks=3, recent=3, groups=2, fanout=3, granularity=granularity,
                       block_size=4).validate()
    run_checked(Stream.open(Engine("cpu"), cfg, data_seed=5, prefill=16, gap=6, k_range=(1, 5)), 25)


@pytest.mark.parametrize("policy", ["tova", "nexus"])
@pytest.mark.parametrize(("start", "sinks"), [(2, 4), (1, 4), (3, 2), (5, 8)])
def test_block_mode_budget_when_positions_do_not_start_on_a_block_boundary(policy: str, start: int,
                                                                          sinks: int) -> None:
    # The API only asks for ascending positions; a stream whose first position is not a multiple
    # of block_size (a resumed or offset context) is valid. The smallest budget validate() allows
    # must still be reachable: "in block mode evictions are whole blocks and the count stays
    # within budget" (DESIGN.md section 2). E.g. block_size=4, sinks=4, budget=4 (allowed), first
    # position 2: the sinks 2,3,4,5 protect blocks 0 and 1, i.e. positions 2..7 = 6 slots > 4.
    cfg = PolicyConfig(policy=policy, sinks=sinks, recent=0, fanout=2, granularity="block", block_size=4)
    cfg = cfg.with_(budget=cfg.protected_capacity())
    run_checked(Stream.open(Engine("cpu"), cfg, data_seed=start, start=start, k_range=(1, 6)), 12)


# -- validation ----------------------------------------------------------------------------------------
def _session_with_evictions() -> tuple[Stream, list[int]]:
    cfg = PolicyConfig(policy="nexus", budget=10, sinks=2, recent=2, groups=2, fanout=3, seed=3)
    s = Stream.open(Engine("cpu"), cfg, data_seed=9, prefill=16)
    hist = run_checked(s, 4)
    gone = sorted({p for call in hist for p in call[0]})
    assert gone
    return s, gone


def _valid(s: Stream) -> StepInput:
    return random_input(np.random.default_rng(0), s.engine.positions(s.handle),
                        np.arange(s.next_pos, s.next_pos + 3), s.cfg.fanout)


def _mutations(s: Stream, gone: list[int]) -> list[tuple[str, str, object]]:
    """(case, expected field, mutation of a valid input) for every kind of invalid input."""
    retained = s.engine.positions(s.handle)
    last_retained = int(retained[0][-1])

    def setf(name: str, value: object):  # type: ignore[no-untyped-def]
        def f(inp: StepInput) -> None:
            setattr(inp, name, value(inp) if callable(value) else value)
        return f

    def poke(name: str, index: tuple, value: float):  # type: ignore[no-untyped-def]
        def f(inp: StepInput) -> None:
            t = getattr(inp, name).clone()
            t[index] = value
            setattr(inp, name, t)
        return f

    nan, inf = float("nan"), float("inf")
    return [
        ("pos 2-D", "new_positions", setf("new_positions", lambda i: i.new_positions[None])),
        ("pos float", "new_positions", setf("new_positions", lambda i: i.new_positions.float())),
        ("pos empty", "new_positions", setf("new_positions", torch.zeros(0, dtype=torch.int64))),
        ("pos descending", "new_positions", setf("new_positions", lambda i: i.new_positions.flip(0))),
        ("pos repeated", "new_positions", poke("new_positions", (1,), s.next_pos)),
        ("pos not after retained", "new_positions", poke("new_positions", (0,), last_retained)),
        ("pos before retained", "new_positions", setf("new_positions", lambda i: i.new_positions - s.next_pos)),
        ("attn wide", "attn", setf("attn", lambda i: torch.cat([i.attn, torch.zeros(2, 1)], 1))),
        ("attn narrow", "attn", setf("attn", lambda i: i.attn[:, :-1])),
        ("attn groups", "attn", setf("attn", lambda i: i.attn[:1])),
        ("attn 3-D", "attn", setf("attn", lambda i: i.attn[None])),
        ("attn int", "attn", setf("attn", lambda i: i.attn.to(torch.int64))),
        ("attn nan", "attn", poke("attn", (1, 0), nan)),
        ("attn inf", "attn", poke("attn", (0, 2), inf)),
        ("attn negative", "attn", poke("attn", (1, 3), -1e-6)),
        ("last shape", "last", setf("last", lambda i: i.last[:, :-1])),
        ("last nan", "last", poke("last", (0, 1), nan)),
        ("last -inf", "last", poke("last", (1, 1), -inf)),
        ("last negative", "last", poke("last", (0, 4), -0.5)),
        ("edge_pos shape", "edge_pos", setf("edge_pos", lambda i: i.edge_pos[:, :, :-1])),
        ("edge_pos float", "edge_pos", setf("edge_pos", lambda i: i.edge_pos.float())),
        ("edge to evicted", "edge_pos", poke("edge_pos", (0, 0, 0), gone[-1])),  # gone: group 0
        ("edge to unknown", "edge_pos", poke("edge_pos", (0, 1, 0), s.next_pos + 100)),
        ("edge after source", "edge_pos", poke("edge_pos", (0, 0, 0), s.next_pos + 2)),
        ("edge below -1", "edge_pos", poke("edge_pos", (1, 2, 1), -2)),
        ("edge_w shape", "edge_w", setf("edge_w", lambda i: i.edge_w[:1])),
        ("edge_w int", "edge_w", setf("edge_w", lambda i: i.edge_w.to(torch.int32))),
        ("edge_w negative", "edge_w", poke("edge_w", (0, 0, 0), -0.1)),
        ("edge_w nan", "edge_w", poke("edge_w", (1, 1, 2), nan)),
        ("edge_w inf", "edge_w", poke("edge_w", (0, 2, 1), inf)),
        ("key_diversity shape", "key_diversity", setf("key_diversity", lambda i: i.key_diversity[:, :-1])),
        ("key_diversity int", "key_diversity", setf("key_diversity", lambda i: i.key_diversity.to(torch.int64))),
        ("key_diversity nan", "key_diversity", poke("key_diversity", (1, 0), nan)),
        ("key_diversity > 1", "key_diversity", poke("key_diversity", (0, 3), 1.0001)),
        ("key_diversity < -1", "key_diversity", poke("key_diversity", (1, 2), -1.5)),
        ("key_norm groups", "key_norm", setf("key_norm", lambda i: i.key_norm[:1])),
        ("key_norm inf", "key_norm", poke("key_norm", (0, 0), inf)),
        ("key_norm negative", "key_norm", poke("key_norm", (1, 4), -1e-6)),
        ("value_norm 1-D", "value_norm", setf("value_norm", lambda i: i.value_norm[0])),
        ("value_norm nan", "value_norm", poke("value_norm", (0, 1), nan)),
        ("value_norm negative", "value_norm", poke("value_norm", (1, 1), -2.0)),
    ]


def test_valid_input_is_accepted() -> None:
    s, _ = _session_with_evictions()
    s.engine.step({s.handle: _valid(s)})


def _cases() -> list[tuple[str, str]]:
    s, gone = _session_with_evictions()
    return [(c, f) for c, f, _ in _mutations(s, gone)]


@pytest.mark.parametrize(("case", "field"), _cases())
def test_invalid_input_rejected_and_nothing_changes(case: str, field: str) -> None:
    s, gone = _session_with_evictions()
    mutate = {c: m for c, _, m in _mutations(s, gone)}[case]
    inp = _valid(s)
    mutate(inp)
    before = s.engine.snapshot(s.handle).to_bytes()
    with pytest.raises(InputError) as err:
        s.engine.step({s.handle: inp})
    assert err.value.field == field, f"{case}: {err.value}"
    assert err.value.reason and field in str(err.value)
    assert s.engine.snapshot(s.handle).to_bytes() == before, f"{case}: the session changed"
    assert s.engine.calls(s.handle) == 4
    # The session still works afterwards.
    s.engine.step({s.handle: _valid(s)})
    assert s.engine.calls(s.handle) == 5


@pytest.mark.parametrize(("case", "field"), _cases()[::3])
def test_bad_session_does_not_stop_the_others(case: str, field: str) -> None:
    # Reference: two good sessions stepped without the bad one.
    def build() -> tuple[Engine, Stream, Stream, Stream, list[int]]:
        eng = Engine("cpu")
        cfg = PolicyConfig(policy="nexus", budget=10, sinks=2, recent=2, groups=2, fanout=3, seed=3)
        good1 = Stream.open(eng, cfg.with_(seed=1), data_seed=1, prefill=12)
        bad = Stream.open(eng, cfg, data_seed=9, prefill=16)
        good2 = Stream.open(eng, cfg.with_(budget=13, groups=1), data_seed=2, prefill=12)
        hist = [evicted_lists(r[1])[0] for r in (step_together([good1, bad, good2])[1] for _ in range(4))]
        return eng, good1, bad, good2, sorted({p for h in hist for p in h})

    eng, g1, bad, g2, gone = build()
    ref = [evicted_lists(o) for _, o in step_together([g1, g2])]
    ref_snaps = [eng.snapshot(g1.handle).to_bytes(), eng.snapshot(g2.handle).to_bytes()]

    eng, g1, bad, g2, gone = build()
    mutate = {c: m for c, _, m in _mutations(bad, gone)}[case]
    inputs = [g1.next_input(), _valid(bad), g2.next_input()]
    mutate(inputs[1])
    before = eng.snapshot(bad.handle).to_bytes()
    out = eng.step({g1.handle: inputs[0], bad.handle: inputs[1], g2.handle: inputs[2]}, raise_errors=False)
    assert isinstance(out[bad.handle], InputError) and out[bad.handle].field == field
    assert eng.snapshot(bad.handle).to_bytes() == before
    for h, expect in zip((g1.handle, g2.handle), ref, strict=True):
        assert isinstance(out[h], StepOutput)
        assert evicted_lists(out[h]) == expect
    assert [eng.snapshot(g1.handle).to_bytes(), eng.snapshot(g2.handle).to_bytes()] == ref_snaps


def test_unknown_and_closed_handles() -> None:
    eng = Engine("cpu")
    cfg = PolicyConfig(policy="tova", budget=4, sinks=0, recent=0, fanout=1)
    h = eng.open(cfg)
    inp = StepInput(torch.arange(2), torch.ones(1, 2), torch.ones(1, 2), torch.full((1, 2, 1), -1),
                    torch.zeros(1, 2, 1))
    with pytest.raises(InputError) as err:
        eng.step({h + 100: inp})
    assert err.value.field == "session"
    out = eng.step({h + 100: inp, h: inp}, raise_errors=False)
    assert isinstance(out[h + 100], InputError) and isinstance(out[h], StepOutput)
    eng.close(h)
    assert h not in eng
    with pytest.raises(InputError):
        eng.positions(h)


def test_closed_rows_are_reused_clean() -> None:
    eng = Engine("cpu")
    cfg = PolicyConfig(policy="nexus", budget=12, sinks=1, recent=2, groups=3, fanout=3, seed=4)
    first = Stream.open(eng, cfg, data_seed=1, prefill=30)
    run_checked(first, 5)
    eng.close(first.handle)
    reused = Stream.open(eng, cfg, data_seed=2)
    fresh = Stream.open(Engine("cpu"), cfg, data_seed=2)
    assert [p.tolist() for p in eng.positions(reused.handle)] == [[], [], []]
    for _ in range(12):
        assert evicted_lists(reused.step()[1]) == evicted_lists(fresh.step()[1])
    assert eng.snapshot(reused.handle).to_bytes() == fresh.engine.snapshot(fresh.handle).to_bytes()


def test_per_layer_groups_evolve_independently() -> None:
    # In per-layer mode each group has its own retained set; attn is padded to the longest group.
    cfg = PolicyConfig(policy="tova", budget=6, sinks=0, recent=0, groups=2, fanout=1)
    eng = Engine("cpu")
    h = eng.open(cfg)
    last = torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2.0], [2, 3, 4, 5, 6, 7, 8, 9.0]])
    none = (torch.full((2, 8, 1), -1), torch.zeros(2, 8, 1))
    out = eng.step({h: StepInput(torch.arange(8), torch.ones(2, 8), last, *none)})[h]
    assert evicted_lists(out) == [[6, 7], [0, 1]]
    assert [p.tolist() for p in eng.positions(h)] == [[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7]]


# -- CUDA parity ----------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_cuda_matches_cpu(policy: str) -> None:
    # Each call: the CUDA engine restores the CPU session's snapshot, and both run the same input.
    # Policies without float reductions (streaming, tova, h2o: elementwise; random: integer hash)
    # must agree exactly. For the others, CUDA reductions may round the last float bit differently,
    # which can only flip the order of two near-tied keys; so at most 10% of calls may differ, and a
    # differing call must evict the same number of slots (the budget arithmetic is exact).
    cfg = PolicyConfig(policy=policy, budget=20, sinks=2, recent=3, groups=2, fanout=4, pool=3, seed=8).validate()
    cpu = Stream.open(Engine("cpu"), cfg, data_seed=17, prefill=30, k_range=(1, 4))
    gpu = Engine("cuda")
    calls, differing = 40, 0
    for _ in range(calls):
        h = gpu.restore(cpu.engine.snapshot(cpu.handle))
        inp = cpu.next_input()
        out_cpu = cpu.engine.step({cpu.handle: inp})[cpu.handle]
        out_gpu = gpu.step({h: inp.to("cuda")})[h].cpu()
        cpu.advance(inp)
        gpu.close(h)
        assert out_gpu.retained == out_cpu.retained
        if not torch.equal(out_gpu.keep, out_cpu.keep):
            differing += 1
    if policy in ("streaming", "tova", "h2o", "random"):
        assert differing == 0
    else:
        assert differing <= calls // 10
