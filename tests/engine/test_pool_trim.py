"""Pool memory follows live state: width classes keep one wide session from widening every row,
Engine.trim gives closed sessions' rows back, and the sessions that remain answer exactly as
they would have without the moves and repacks."""

from __future__ import annotations

import torch
from nexus_sidecar.engine import Engine, PolicyConfig
from nexus_sidecar.engine.pool import slot_bytes

from tests.server.conftest import SMALL, SimSession


def _step(eng: Engine, h: int, sim: SimSession, k: int | None = None) -> list[list[int]]:
    p = sim.make(k=k)
    out = eng.step({h: p.inp})[h]
    for gi in range(sim.cfg.groups):
        slots = torch.cat([sim.retained[gi], p.new])
        sim.retained[gi] = slots[out.keep[gi, : slots.numel()]]
    sim.next_pos = int(p.new[-1]) + 1
    sim.ws.step += 1
    sim.ws.retained_count = sum(out.retained)
    return [e.tolist() for e in out.evicted]


def test_trim_frees_closed_rows_and_width_and_keeps_answers() -> None:
    cfg = PolicyConfig(**SMALL).validate()
    trimmed, plain = Engine(torch.device("cpu")), Engine(torch.device("cpu"))
    sims = {name: [SimSession(f"s{i}", seed=i) for i in range(40)] for name in ("t", "p")}
    handles = {"t": [trimmed.open(cfg) for _ in range(40)], "p": [plain.open(cfg) for _ in range(40)]}
    for name, eng in (("t", trimmed), ("p", plain)):
        for h, sim in zip(handles[name], sims[name], strict=True):
            _step(eng, h, sim)
        _step(eng, handles[name][0], sims[name][0], k=3000)  # one wide prefill widens every row
    wide = trimmed.pool_bytes()
    per_slot = slot_bytes(cfg.fanout)
    # Width classes: the wide session moved to a 4096-column pool of its own (1 row); the 39 others
    # stay in the 64-column pool. Before, every one of the 64 rows became ~3,800 columns wide.
    assert wide == 64 * 64 * per_slot + 1 * 4096 * per_slot, wide
    for h in handles["t"][:36]:
        trimmed.close(h)
    freed = trimmed.trim()
    # 4 live rows left in the 64-column class: 16 rows; the wide class is empty and dropped.
    assert freed > 0 and trimmed.pool_bytes() == 16 * 64 * per_slot, (wide, trimmed.pool_bytes())
    assert trimmed.pool_bytes() == trimmed.bytes_after_step({})
    for _ in range(6):
        for i in range(36, 40):
            a = _step(trimmed, handles["t"][i], sims["t"][i])
            b = _step(plain, handles["p"][i], sims["p"][i])
            assert a == b
    for i in range(36, 40):
        assert [p.tolist() for p in trimmed.positions(handles["t"][i])] == \
            [p.tolist() for p in plain.positions(handles["p"][i])]
        assert trimmed.snapshot(handles["t"][i]).equals(plain.snapshot(handles["p"][i]))


def test_trim_drops_an_empty_pool_and_projections_match_allocation() -> None:
    eng = Engine(torch.device("cpu"))
    cfg = PolicyConfig(**{**SMALL, "fanout": 2}).validate()
    before = eng.pool_bytes()
    predicted = eng.bytes_after_open(cfg)
    h = eng.open(cfg)
    assert eng.pool_bytes() == predicted > before
    sim = SimSession("x", config={**SMALL, "fanout": 2})
    predicted = eng.bytes_after_step({h: 500})
    _step(eng, h, sim, k=500)
    assert eng.pool_bytes() == predicted
    eng.close(h)
    eng.trim()
    assert eng.pool_bytes() == before == 0


def test_a_session_that_moves_up_width_classes_answers_like_a_fresh_restore() -> None:
    # 40 new tokens per call and a budget of 400: the arena crosses the 64, 128, 256 and 512
    # column classes; after every move the session must answer exactly as its own snapshot
    # restored into a fresh engine (the move kept positions, ages, memory and edges).
    config = {**SMALL, "budget": 400, "recent": 8}
    cfg = PolicyConfig(**config).validate()
    eng = Engine(torch.device("cpu"))
    sim = SimSession("m", config=config, seed=5)
    h = eng.open(cfg)
    widths = set()
    for _ in range(14):
        fresh = Engine(torch.device("cpu"))
        h2 = fresh.restore(eng.snapshot(h))
        p = sim.make(k=40)
        a = eng.step({h: p.inp})[h]
        b = fresh.step({h2: p.inp})[h2]
        assert torch.equal(a.keep, b.keep) and [e.tolist() for e in a.evicted] == [e.tolist() for e in b.evicted]
        for gi in range(sim.cfg.groups):
            slots = torch.cat([sim.retained[gi], p.new])
            sim.retained[gi] = slots[a.keep[gi, : slots.numel()]]
        sim.next_pos = int(p.new[-1]) + 1
        widths.add(eng._sessions[h].pool.width)
        assert eng.snapshot(h).equals(fresh.snapshot(h2))
    assert {64, 128, 256, 512} <= widths, widths
