"""The session state: byte layout round trip, restore-and-continue, and corrupt blobs."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from nexus_sidecar.engine import POLICIES, Engine, PolicyConfig, SessionState, StateError
from nexus_sidecar.engine.state import MAGIC, VERSION

from tests.engine.streams import Stream, evicted_lists, run_checked


def _stream(policy: str = "nexus", groups: int = 2, **kw: object) -> Stream:
    cfg = PolicyConfig(policy=policy, budget=16, sinks=2, recent=3, groups=groups, fanout=4, seed=21, tau=2.0,
                       **kw).validate()  # type: ignore[arg-type]
    return Stream.open(Engine("cpu"), cfg, data_seed=77, prefill=25, k_range=(1, 5))


def _blob(calls: int = 8, **kw: object) -> bytes:
    s = _stream(**kw)  # type: ignore[arg-type]
    run_checked(s, calls)
    return s.engine.snapshot(s.handle).to_bytes()


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_round_trip_is_bit_exact(policy: str, groups: int) -> None:
    s = _stream(policy, groups)
    run_checked(s, 10)
    snap = s.engine.snapshot(s.handle)
    blob = snap.to_bytes()
    back = SessionState.from_bytes(blob)
    assert back.to_bytes() == blob and back.equals(snap)
    assert back.config == snap.config
    assert (back.calls, back.tokens_seen, back.tokens_evicted) == (snap.calls, snap.tokens_seen, snap.tokens_evicted)
    assert back.calls == 10
    assert back.tokens_seen == s.next_pos
    # tokens_evicted counts evictions over all groups (each group saw every token).
    assert back.tokens_evicted == groups * back.tokens_seen - sum(len(p) for p in s.engine.positions(s.handle))
    for a, b, pos in zip(back.groups, snap.groups, s.engine.positions(s.handle), strict=True):
        assert torch.equal(a.pos, pos)
        for f in ("pos", "age", "memory", "edge_pos", "edge_w"):
            x, y = getattr(a, f), getattr(b, f)
            assert x.dtype == y.dtype or f == "edge_pos"
            assert torch.equal(x.to(y.dtype), y), f


def test_empty_session_round_trip() -> None:
    eng = Engine("cpu")
    cfg = PolicyConfig(policy="h2o", budget=8, sinks=1, recent=1, groups=2, fanout=3, tau=float("inf"))
    blob = eng.snapshot(eng.open(cfg)).to_bytes()
    back = SessionState.from_bytes(blob)
    assert back.to_bytes() == blob and back.config.tau == float("inf") and back.calls == 0


@pytest.mark.parametrize(("randomness", "pool"), [("fixed", 1), ("per_call", 1), ("fixed", 3)])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_restore_continues_identically(policy: str, randomness: str, pool: int) -> None:
    original = _stream(policy, 2, randomness=randomness, pool=pool)
    run_checked(original, 8)
    blob = original.engine.snapshot(original.handle).to_bytes()

    # A second engine (another process, after a restart) restores the blob; same input generator.
    other = Engine("cpu")
    h = other.restore(SessionState.from_bytes(blob))
    assert other.calls(h) == 8
    assert [p.tolist() for p in other.positions(h)] == [p.tolist() for p in original.engine.positions(original.handle)]
    clone = Stream(other, h, original.cfg, original.rng, k_range=original.k_range)
    clone.next_pos, clone.calls, clone.first_positions = original.next_pos, original.calls, original.first_positions
    # Fork the generator so both continuations see the same inputs.
    state = original.rng.bit_generator.state
    clone.rng = type(original.rng)(type(original.rng.bit_generator)())
    clone.rng.bit_generator.state = state
    a = run_checked(original, 15)
    b = run_checked(clone, 15)
    assert a == b
    assert any(any(e) for e in a)
    assert original.engine.snapshot(original.handle).to_bytes() == other.snapshot(h).to_bytes()


def test_restore_into_a_busy_engine() -> None:
    # Restored rows land wherever the pool has room; the result must not care.
    s = _stream("nexus", 3)
    run_checked(s, 6)
    snap = s.engine.snapshot(s.handle)
    eng = Engine("cpu")
    for i in range(5):
        run_checked(Stream.open(eng, s.cfg.with_(seed=i, budget=30), data_seed=i, prefill=40), 3)
    h = eng.restore(SessionState.from_bytes(snap.to_bytes()))
    assert eng.snapshot(h).to_bytes() == snap.to_bytes()
    inp = s.next_input()
    out_a = s.engine.step({s.handle: inp})[s.handle]
    out_b = eng.step({h: inp})[h]
    assert evicted_lists(out_a) == evicted_lists(out_b)


def test_restore_rejects_group_mismatch() -> None:
    snap = SessionState.from_bytes(_blob(groups=2))
    snap.groups = snap.groups[:1]
    with pytest.raises(Exception) as err:
        Engine("cpu").restore(snap)
    assert getattr(err.value, "field", None) == "state.groups"


# -- corruption ----------------------------------------------------------------------------------------
def test_every_single_byte_flip_is_detected() -> None:
    blob = _blob(calls=3)
    for i in range(0, len(blob), max(1, len(blob) // 200)):
        bad = bytearray(blob)
        bad[i] ^= 0x40
        with pytest.raises(StateError) as err:
            SessionState.from_bytes(bytes(bad))
        assert err.value.field == "state"


@pytest.mark.parametrize("cut", [0, 1, 4, 11, 12, 100, -1, -4, -5, -100])
def test_truncated_blob(cut: int) -> None:
    blob = _blob(calls=3)
    with pytest.raises(StateError) as err:
        SessionState.from_bytes(blob[:cut])
    assert err.value.field == "state"
    assert "short" in err.value.reason or "checksum" in err.value.reason


def test_truncated_blob_with_a_valid_checksum_is_a_state_error() -> None:
    # A blob cut short and re-checksummed (e.g. written by a buggy writer) must still be a precise
    # StateError, never a struct/numpy exception the server cannot map to a status code.
    blob = _blob(calls=3)
    body = blob[:-4]
    others: dict[str, int] = {}
    for cut in range(12, len(body)):
        try:
            SessionState.from_bytes(_with_crc(body[:cut]))
        except StateError:
            continue
        except Exception as exc:
            others.setdefault(type(exc).__name__, cut)
        else:
            others.setdefault("no error", cut)
    assert not others, f"non-StateError outcomes (first cut offset of each): {others}"


def test_trailing_bytes() -> None:
    body = _blob(calls=2)[:-4]
    with pytest.raises(StateError) as err:
        SessionState.from_bytes(_with_crc(body + b"\0\0"))
    assert "trailing" in err.value.reason


def test_wrong_magic() -> None:
    body = bytearray(_blob(calls=2)[:-4])
    body[:4] = b"XXSS"
    with pytest.raises(StateError) as err:
        SessionState.from_bytes(_with_crc(bytes(body)))
    assert err.value.field == "state" and "magic" in err.value.reason
    assert MAGIC == b"NXSS"


@pytest.mark.parametrize("version", [0, VERSION + 1, 0xFFFF])
def test_wrong_version(version: int) -> None:
    body = bytearray(_blob(calls=2)[:-4])
    struct.pack_into("<H", body, 4, version)
    with pytest.raises(StateError) as err:
        SessionState.from_bytes(_with_crc(bytes(body)))
    assert err.value.field == "state" and "version" in err.value.reason and str(version) in err.value.reason


def test_bad_config_inside_the_blob() -> None:
    snap = SessionState.from_bytes(_blob(calls=2))
    body = bytearray(snap.to_bytes()[:-4])
    cfg = snap.config.to_json().encode()
    start = body.index(cfg)
    bad = cfg.replace(b'"budget": 16', b'"budget": -1')
    assert (bad != cfg and len(bad) != len(cfg)) or True
    body[start : start + len(cfg)] = bad
    struct.pack_into("<I", body, 8, len(bad))
    with pytest.raises(StateError) as err:
        SessionState.from_bytes(_with_crc(bytes(body)))
    assert err.value.field == "state.config" and "budget" in err.value.reason
    body2 = bytearray(snap.to_bytes()[:-4])
    body2[start : start + 1] = b"["  # not JSON any more
    with pytest.raises(StateError) as err:
        SessionState.from_bytes(_with_crc(bytes(body2)))
    assert err.value.field == "state.config"


@pytest.mark.parametrize(("knobs", "defaults"), [
    ({"attn_reduce": "sum", "pool_reduce": "max"}, {}),
    ({"prior": "key_diversity", "prior_mix": 0.5, "prior_sharpness": 1.0},
     {"prior": "value_norm", "prior_mix": 0.25, "prior_sharpness": 3.0}),
    # Written before call kinds: the reaction term scored every call, and no question share existed.
    ({"react_calls": "all", "question_prior_mix": None}, {"react_calls": "question", "question_prior_mix": 0.3}),
])
def test_a_blob_written_before_knobs_existed_restores_with_their_defaults(knobs: dict, defaults: dict) -> None:
    # Rolling upgrade: checkpoints in Redis may predate a knob (attn_reduce / pool_reduce, prior /
    # prior_mix, react_calls). Their config JSON lacks its key; it must restore with the default of
    # the time it was written (the behaviour it was written under), whatever today's default is.
    s = _stream(groups=1, **defaults)
    run_checked(s, 6)
    snap = s.engine.snapshot(s.handle)
    body = bytearray(snap.to_bytes()[:-4])
    cfg = snap.config.to_json().encode()
    start = body.index(cfg)
    old = json.loads(cfg)
    for name in knobs:
        del old[name]
    old_cfg = json.dumps(old, sort_keys=True).encode()
    body[start : start + len(cfg)] = old_cfg
    struct.pack_into("<I", body, 8, len(old_cfg))
    restored = SessionState.from_bytes(_with_crc(bytes(body)))
    assert restored.config == snap.config.with_(**knobs)
    assert {name: getattr(restored.config, name) for name in knobs} == knobs
    snap.config = snap.config.with_(**knobs)
    assert restored.to_bytes() == snap.to_bytes()  # re-written in the new layout, nothing else changed


def test_a_v1_blob_with_int32_edges_reads_as_int64() -> None:
    # v1 stored edge target positions as i32; v2 as i64 (positions above 2^31 - 1 are exact).
    s = _stream(groups=1)
    run_checked(s, 6)
    snap = s.engine.snapshot(s.handle)
    g = snap.groups[0]
    n, fan = g.pos.numel(), snap.config.fanout
    v2 = snap.to_bytes()[:-4]
    # Rewrite the group arrays with i32 edges and version 1.
    head_len = len(v2) - (4 + n * (8 + 4 + 4) + n * fan * (8 + 4))
    arrays = v2[head_len + 4:]
    edges_at = n * 16
    epos = np.frombuffer(arrays, dtype="<i8", count=n * fan, offset=edges_at).astype("<i4").tobytes()
    v1 = bytearray(v2[:head_len + 4] + arrays[:edges_at] + epos + arrays[edges_at + n * fan * 8:])
    struct.pack_into("<H", v1, 4, 1)
    restored = SessionState.from_bytes(_with_crc(bytes(v1)))
    assert restored.groups[0].edge_pos.dtype == torch.int64
    assert restored.to_bytes() == snap.to_bytes()
