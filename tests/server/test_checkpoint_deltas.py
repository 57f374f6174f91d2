"""Delta checkpoints through the service, against a real redis-server: what the store holds after
full + delta equals a full checkpoint of the same step, bit-exactly, at every checkpoint of a
stream that evicts and compacts while it is being checkpointed; a missing or corrupt delta falls
back to the full checkpoint and the worker's resync, never to a wrong state."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
import redis
import torch
from nexus_sidecar.engine import Engine
from nexus_sidecar.server.checkpoint import Checkpoint, DeltaCheckpoint, load

from tests.server.conftest import (
    SMALL,
    Reference,
    SimSession,
    arun,
    assert_same_answer,
    client,
    drive,
    expect_error,
    http,
    running_sidecar,
    sample_value,
)

CONFIG = {**SMALL, "groups": 2}


def _key(sid: str) -> str:
    return f"nexus:{{default:{sid}}}:state"


def _record(r: redis.Redis, sid: str) -> dict[bytes, bytes]:
    return r.hgetall(_key(sid))


def test_every_stored_checkpoint_equals_a_full_one_of_its_step(redis_server: Any) -> None:
    """checkpoint_every=1, a full one every 4th: the test reads the store after every step while
    the service goes on stepping; each record read back (full + delta) must equal a full
    checkpoint of the reference engine at that record's step, and restoring it must continue
    with the same answers."""

    async def body() -> None:
        async with running_sidecar(store=redis_server.url, checkpoint_every=1, checkpoint_full_every=4) as sc:
            c = client(sc)
            sims = [SimSession(f"d{i}", config=CONFIG, seed=11 + i, k=1 + 2 * i) for i in range(2)]
            ref = Reference()
            for s in sims:
                await c.open_session(s.session_id, s.config)
                ref.open(s)
            snaps: dict[tuple[str, int], bytes] = {}
            seen: dict[tuple[str, int], dict[bytes, bytes]] = {}
            kinds = set()
            with redis_server.client() as r:
                for _ in range(40):
                    await drive(c, sims, 1, ref)
                    for s in sims:  # what a full checkpoint at this step holds (the reference's engine)
                        snaps[(s.session_id, s.ws.step)] = ref.engine.snapshot(ref.handles[s.session_id]).to_bytes()
                        rec = _record(r, s.session_id)  # a background checkpoint may be in flight: any step
                        if rec.get(b"step"):
                            seen[(s.session_id, int(rec[b"step"]))] = rec
                            kinds.add(b"delta" in rec)
            await c.close()
            assert kinds == {True, False}, "both full records and full + delta records were read back"
            checked = 0
            for (sid, step), rec in seen.items():
                loaded = load(rec[b"blob"], rec.get(b"delta"), int(rec[b"step"]))
                assert loaded.fallback is None
                assert loaded.checkpoint.step == step
                assert loaded.checkpoint.state.to_bytes() == snaps[(sid, step)], f"{sid} at step {step}"
                checked += 1
            assert checked >= 20
            # The deltas are small next to the full checkpoints (4 bytes of EMA memory per slot
            # plus the appended slots, vs ~100 bytes per slot).
            rec = seen[max(seen, key=lambda k: (b"delta" in seen[k], k[1]))]
            assert len(rec[b"delta"]) * 3 < len(rec[b"blob"])
            text = (await http(sc).get("/metrics")).text
            for kind in ("full", "delta"):
                assert sample_value(text, "nexus_checkpoint_bytes_total", tenant="default", kind=kind) > 0
                assert sample_value(text, "nexus_checkpoint_duration_seconds_count", kind=kind, phase="capture") > 0
            assert sample_value(text, "nexus_checkpoint_bytes_per_step_count", tenant="default") > 0

        # Resume both elsewhere from full + delta: the stream goes on with the reference's answers.
        async with running_sidecar(store=redis_server.url, checkpoint_every=1) as other:
            c = client(other)
            await drive(c, sims, 5, ref)
            text = (await http(other).get("/metrics")).text
            assert sample_value(text, "nexus_sessions_resumed_total", tenant="default") == 2
            assert sample_value(text, "nexus_checkpoint_delta_fallbacks_total", tenant="default") == 0
            await c.close()

    arun(body(), timeout=180)


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "other_base"])
def test_a_bad_delta_falls_back_to_the_full_checkpoint_and_the_worker_resyncs(
        redis_server: Any, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nexus_sidecar.sessions")

    async def body() -> None:
        sim = SimSession("bad", config=CONFIG, seed=5)
        async with running_sidecar(store=redis_server.url, checkpoint_every=2, checkpoint_full_every=8) as a:
            c = client(a)
            await c.open_session("bad", sim.config)
            await drive(c, [sim], 10)
            await c.close()
        # Stopped gracefully: the store holds step 10 as a full checkpoint of an earlier step + a delta.
        with redis_server.client() as r:
            rec = _record(r, "bad")
            base = int(rec[b"full"])
            assert int(rec[b"step"]) == 10 and base < 10 and b"delta" in rec
            full = Checkpoint.from_bytes(rec[b"blob"])
            assert full.step == base
            delta = rec[b"delta"]
            if damage == "flip":
                bad = bytearray(delta)
                bad[len(bad) // 2] ^= 0x01
                r.hset(_key("bad"), "delta", bytes(bad))
            elif damage == "truncate":
                r.hset(_key("bad"), "delta", delta[:-10])
            elif damage == "missing":
                r.hdel(_key("bad"), "delta")
            else:  # a well-formed delta taken against another full checkpoint (same step, other bytes)
                d = DeltaCheckpoint.from_bytes(delta)
                d.base_crc ^= 1
                r.hset(_key("bad"), "delta", d.to_bytes())
        async with running_sidecar(store=redis_server.url, checkpoint_every=2) as b:
            c = client(b)
            p = sim.make()
            msg = await expect_error(c.step([p.msg]), grpc.StatusCode.FAILED_PRECONDITION)
            assert f"expected step {base + 1}" in msg, msg  # resumed at the full checkpoint, not later
            sim.ws.positions = [x.clone() for x in sim.retained]
            resp = await c.resync(sim.ws)
            assert resp.step == 10 and resp.previous_step == base
            text = (await http(b).get("/metrics")).text
            assert sample_value(text, "nexus_checkpoint_delta_fallbacks_total", tenant="default") == 1
            # From here the service answers as an engine restored from the same re-seeded state.
            from nexus_sidecar.server.resync import reseed

            ref = Engine(torch.device("cpu"))
            h = ref.restore(reseed(sim.cfg, full.state, sim.retained, 10).state)
            for _ in range(4):
                p = sim.make()
                res = (await c.step([p.msg]))[0]
                assert_same_answer(res, ref.step({h: p.inp})[h], f"after the fallback, step {p.msg.step}")
                sim.apply(p, res)
            await c.close()

    arun(body(), timeout=120)
    assert any("is unusable" in m.getMessage() for m in caplog.records)


def test_late_delta_of_a_fenced_replica_is_refused(redis_server: Any) -> None:
    """A's delta is cut at step 5; before it reaches the store, B takes the session over (a newer
    owner epoch). A's late write is fenced and changes nothing in the store."""

    async def body() -> None:
        sim = SimSession("late", config=CONFIG, seed=8)
        async with running_sidecar(store=redis_server.url, checkpoint_every=0) as a, \
                running_sidecar(store=redis_server.url, checkpoint_every=0) as b:
            ca = client(a)
            await ca.open_session("late", sim.config)
            await drive(ca, [sim], 3)
            hs = a.sessions.hot_sessions()[0]
            assert await a.sessions.checkpoint(hs)  # full at step 3
            await drive(ca, [sim], 2)
            async with hs.lock, hs.writing:  # A's cut at step 5, as a delta against step 3
                cap = await a.sessions._capture(hs)
            assert cap.kind == "delta" and cap.step == 5
            taken = await b.sessions.get("default", "late")  # B resumes (step 3) with a newer epoch
            assert taken.step == 3 and taken.epoch > hs.epoch
            with redis_server.client() as r:
                before = _record(r, "late")
                assert await a.sessions._store(hs, cap) is None  # fenced
                assert _record(r, "late") == before
            assert int(before[b"epoch"]) == taken.epoch and int(before[b"step"]) == 3
            await ca.close()

    arun(body(), timeout=60)
