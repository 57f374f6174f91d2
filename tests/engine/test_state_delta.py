"""Delta states (NXSD): base + delta == the full snapshot, bit-exactly, over random call streams
(varied k, evictions, compaction, restore in between), and precise errors on a bad delta."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nexus_sidecar.engine import Engine, PolicyConfig, SessionState, StateError
from nexus_sidecar.engine.state import Anchor, StateDelta

from tests.engine.streams import Stream


def _stream(policy: str, groups: int, seed: int, eng: Engine | None = None) -> Stream:
    cfg = PolicyConfig(policy=policy, budget=24, sinks=2, recent=3, groups=groups, fanout=4, seed=seed, tau=2.0,
                       ).validate()
    return Stream.open(eng or Engine("cpu"), cfg, data_seed=seed, prefill=30, k_range=(1, 6))


def _delta_state(eng: Engine, h: int, base: SessionState) -> tuple[SessionState, StateDelta, bytes]:
    delta = StateDelta.diff(Anchor.of(base), eng.capture(h, since=base.calls))
    assert delta is not None
    blob = delta.to_bytes()
    back = StateDelta.from_bytes(blob)
    return back.apply(base), delta, blob


@pytest.mark.parametrize("kernels", ["torch", "fused"])
@pytest.mark.parametrize("policy", ["nexus", "h2o", "tova", "snapkv"])
@pytest.mark.parametrize("groups", [1, 3])
def test_base_plus_delta_is_the_full_snapshot(policy: str, groups: int, kernels: str) -> None:
    """Both engine paths (the fused kernels and the torch reference) keep the pool's invariants."""
    rng = np.random.default_rng(groups * 31 + len(policy))
    s = _stream(policy, groups, seed=5 + groups, eng=Engine("cpu", kernels=kernels))
    eng, h = s.engine, s.handle
    base = eng.snapshot(h)
    compactions = 0
    last_used = list(eng._sessions[h].used)
    for call in range(90):
        s.step()
        used = eng._sessions[h].used
        compactions += sum(u < lu for u, lu in zip(used, last_used, strict=True))
        last_used = list(used)
        full = eng.snapshot(h)
        got, delta, _ = _delta_state(eng, h, base)
        assert got.to_bytes() == full.to_bytes(), f"call {call}: base at call {base.calls} + delta != snapshot"
        # What a restore from it continues with is the same session: restoring both gives equal state.
        if call % 30 == 29:
            other = Engine("cpu")
            assert other.snapshot(other.restore(got)).to_bytes() == full.to_bytes()
        if policy in ("nexus", "h2o") and full.calls > base.calls and base.groups[0].pos.numel():
            assert all(d.memory_mode == 1 for d in delta.groups), "EMA memory changes on every live slot"
        if policy in ("tova", "snapkv"):
            assert all(d.memory_mode == 0 and d.memory.size == d.new_pos.size for d in delta.groups)
        if rng.random() < 0.15:  # a new full checkpoint: deltas start over from it
            base = full
    assert compactions >= 2, "the stream must compact rows between base and delta"


def test_delta_after_restore_and_from_an_empty_base() -> None:
    eng = Engine("cpu")
    cfg = PolicyConfig(policy="nexus", budget=16, sinks=1, recent=2, groups=2, fanout=3, seed=3).validate()
    h = eng.open(cfg)
    empty = eng.snapshot(h)
    s = Stream(eng, h, cfg, np.random.default_rng(1), k_range=(1, 5))
    for _ in range(12):
        s.step()
    got, _, _ = _delta_state(eng, h, empty)
    assert got.to_bytes() == eng.snapshot(h).to_bytes()
    # A session resumed elsewhere from a snapshot: deltas against that snapshot still hold.
    snap = eng.snapshot(h)
    h2 = eng.restore(snap)
    s2 = Stream(eng, h2, cfg, np.random.default_rng(2), k_range=(1, 5))
    s2.next_pos = s.next_pos
    for _ in range(20):
        s2.step()
    got, _, _ = _delta_state(eng, h2, snap)
    assert got.to_bytes() == eng.snapshot(h2).to_bytes()


def test_delta_is_small_for_a_decode_step() -> None:
    eng = Engine("cpu")
    cfg = PolicyConfig(policy="nexus", budget=1024, recent=32, fanout=8).validate()
    s = Stream.open(eng, cfg, data_seed=4, prefill=1100, k_range=(1, 1))
    s.step()
    base = eng.snapshot(s.handle)
    for _ in range(16):
        s.step()
    _, delta, blob = _delta_state(eng, s.handle, base)
    full = len(eng.snapshot(s.handle).to_bytes())
    d = delta.groups[0]
    assert d.new_pos.size == 16 and d.evicted.size == 16
    # 4 bytes of memory per retained slot + ~112 bytes per appended slot + 8 per eviction.
    assert len(blob) < 1024 * 4 + 16 * 120 + 16 * 8 + 200
    assert len(blob) * 15 < full


def test_corrupt_or_mismatched_deltas_are_refused() -> None:
    s = _stream("nexus", 2, seed=9)
    eng, h = s.engine, s.handle
    for _ in range(5):
        s.step()
    base = eng.snapshot(h)
    for _ in range(7):
        s.step()
    _, delta, blob = _delta_state(eng, h, base)
    for i in (0, 5, 20, len(blob) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[i] ^= 0x10
        with pytest.raises(StateError):
            StateDelta.from_bytes(bytes(bad))
    with pytest.raises(StateError, match=r"too short|checksum"):
        StateDelta.from_bytes(blob[:-9])
    # Against another base (an older or newer full state): refused, naming why.
    older = _stream("nexus", 2, seed=9)
    for _ in range(4):
        older.step()
    with pytest.raises(StateError, match="base_calls"):
        delta.apply(older.engine.snapshot(older.handle))
    same_calls = SessionState(base.config, base.calls, base.tokens_seen, base.tokens_evicted,
                              [type(g)(g.pos + 1000, g.age, g.memory, g.edge_pos, g.edge_w) for g in base.groups])
    if any(d.evicted.size for d in delta.groups):
        with pytest.raises(StateError, match="evicted"):
            delta.apply(same_calls)
    # A capture that does not extend the anchor (the anchor is another session's) gives no delta.
    stranger = _stream("nexus", 2, seed=10)
    for _ in range(6):
        stranger.step()
    foreign = Anchor.of(stranger.engine.snapshot(stranger.handle))
    foreign.calls = base.calls
    assert StateDelta.diff(foreign, eng.capture(h, since=base.calls)) is None
    with pytest.raises(StateError, match="delta capture"):
        eng.capture(h, since=base.calls).state()


def test_capture_is_a_copy() -> None:
    s = _stream("nexus", 1, seed=2)
    for _ in range(3):
        s.step()
    cap = s.engine.capture(s.handle)
    before = cap.state().to_bytes()
    for _ in range(3):
        s.step()  # the pool changes in place; the capture must not
    assert cap.state().to_bytes() == before
    assert torch.equal(cap.state().groups[0].pos, SessionState.from_bytes(before).groups[0].pos)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_capture_and_delta() -> None:
    """On CUDA the capture copies device rows to the host (the delta's new-slot edges by index)."""
    s = _stream("nexus", 2, seed=4, eng=Engine("cuda"))
    eng, h = s.engine, s.handle
    for _ in range(3):
        s.step()
    base = eng.snapshot(h)
    for _ in range(25):
        s.step()
        got, _, _ = _delta_state(eng, h, base)
        assert got.to_bytes() == eng.snapshot(h).to_bytes()
