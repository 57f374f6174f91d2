"""Engine.trim: closed sessions and a once-wide session stop costing pool memory, and the
sessions that remain answer exactly as they would have without the repack."""

from __future__ import annotations

import torch
from nexus_sidecar.engine import Engine, PolicyConfig

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
    for h in handles["t"][:36]:
        trimmed.close(h)
    freed = trimmed.trim()
    # 4 live rows of one pool: 16 rows x the live width instead of 64 rows x the widest-ever width.
    assert freed > 0 and trimmed.pool_bytes() < wide / 8, (wide, trimmed.pool_bytes())
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
