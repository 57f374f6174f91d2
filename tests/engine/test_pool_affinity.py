"""Rows by batch affinity: a batch's pool rows become one contiguous block (a view, not a gather),
whatever order its sessions were opened in, and nothing a caller sees changes."""

from __future__ import annotations

import pytest
import torch
from nexus_sidecar.engine import Engine, PolicyConfig
from nexus_sidecar.engine.pool import SessionPool

from tests.engine.streams import Stream, evicted_lists, step_together


def _cfg(groups: int, seed: int) -> PolicyConfig:
    return PolicyConfig(policy="nexus", budget=12, sinks=1, recent=2, groups=groups, fanout=3, seed=seed).validate()


def _batch_rows(eng: Engine, streams: list[Stream]) -> list[int]:
    return [r for s in streams for r in eng._sessions[s.handle].rows]


def _is_view(eng: Engine, streams: list[Stream]) -> bool:
    rows = _batch_rows(eng, streams)
    return eng._sessions[streams[0].handle].pool.rows_of(rows).first is not None


@pytest.mark.parametrize("kernels", ["fused", "torch"])
def test_interleaved_sessions_become_contiguous_and_results_do_not_change(kernels: str) -> None:
    # Two workers' sessions opened interleaved (A1 B1 A2 B2 ...), each worker stepping its own batch.
    eng = Engine("cpu", kernels=kernels)
    a, b = [], []
    for i in range(4):
        a.append(Stream.open(eng, _cfg(1 + i % 2, i), data_seed=i, prefill=20))
        b.append(Stream.open(eng, _cfg(2 - i % 2, 10 + i), data_seed=10 + i, prefill=20))
    assert not _is_view(eng, a) and not _is_view(eng, b)
    # The reference: each worker alone in its own engine, its sessions opened back to back.
    ref_eng = {"a": Engine("cpu", kernels=kernels), "b": Engine("cpu", kernels=kernels)}
    ref = {"a": [Stream.open(ref_eng["a"], _cfg(1 + i % 2, i), data_seed=i, prefill=20) for i in range(4)],
           "b": [Stream.open(ref_eng["b"], _cfg(2 - i % 2, 10 + i), data_seed=10 + i, prefill=20) for i in range(4)]}
    pool = eng._sessions[a[0].handle].pool
    moves = []
    real = pool.make_contiguous
    pool.make_contiguous = lambda rows: moves.append(real(rows)) or moves[-1]  # type: ignore[method-assign]
    for call in range(12):
        for name, batch in (("a", a), ("b", b)):
            got = step_together(batch)
            want = step_together(ref[name])
            assert _is_view(eng, batch), f"call {call}: batch {name} is not contiguous after its step"
            for (_, out), (_, exp), s, r in zip(got, want, batch, ref[name], strict=True):
                assert evicted_lists(out) == evicted_lists(exp)
                assert torch.equal(out.keep, exp.keep) and torch.equal(out.retained_mass, exp.retained_mass)
                assert eng.snapshot(s.handle).to_bytes() == ref_eng[name].snapshot(r.handle).to_bytes()
    # Both batches stay contiguous side by side: the rows moved on the first round only (no ping-pong).
    assert any(moves[:2]) and not any(moves[2:])
    assert _is_view(eng, a) and _is_view(eng, b)


def test_make_contiguous_moves_whole_rows_and_the_free_list() -> None:
    pool = SessionPool(fanout=2, device=torch.device("cpu"), rows=8, width=4)
    taken = pool.alloc(8)
    pool.free([taken[1], taken[6]])
    # Mark every row's content with its id, in every field.
    for r in range(8):
        pool.slot["pos"][r] = r
        pool.slot["memory"][r] = float(r)
        pool.edge["edge_idx"][r] = r
        pool.used[r], pool.count[r] = r, r
        pool.params["seed"][r] = 100 + r
    batch = [5, 2, 7]
    moved = pool.make_contiguous(batch)
    new_rows = [moved.get(r, r) for r in batch]
    assert new_rows == list(range(new_rows[0], new_rows[0] + 3))
    for old in range(8):
        new = moved.get(old, old)
        assert int(pool.slot["pos"][new, 0]) == old and float(pool.slot["memory"][new, 3]) == old
        assert int(pool.edge["edge_idx"][new, 2, 1]) == old
        assert int(pool.used[new]) == old and int(pool.params["seed"][new]) == 100 + old
    assert sorted(pool._free) == sorted(moved.get(f, f) for f in (1, 6))
    assert sorted(moved) == sorted(moved.values()), "a permutation of rows"
    assert pool.make_contiguous(new_rows) == {}
