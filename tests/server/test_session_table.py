"""The columnar session table (server/session_table.py) and the step path built on it.

1. The table's lock keeps ``asyncio.Lock``'s semantics (FIFO, cancellation, detaching), and the
   batch lock takes B locks at once only when none is held or awaited.
2. A differential test over random streams of opens, steps (both RPC forms), retries (same and
   changed payload), out-of-order steps, wrong worker state, unknown and duplicate ids, closes,
   resyncs and concurrent duplicate RPCs, through a real sidecar: every RPC gets the code the
   step protocol (today's per-session path, written out plainly below as :class:`Model`) gives,
   and every answer equals the in-process engine's (retries: the cached answer, byte for byte).
"""

from __future__ import annotations

import asyncio
import random

import grpc
import numpy as np
import pytest
import torch
from nexus_client.client import AsyncNexusClient
from nexus_client.columnar import read_answer
from nexus_client.errors import SidecarError
from nexus_client.packing import checksum_of
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_sidecar.engine import PolicyConfig
from nexus_sidecar.server.resync import reseed
from nexus_sidecar.server.session_table import HotSession, SessionTable

from tests.server.conftest import (
    SMALL,
    Planned,
    Reference,
    SimSession,
    arun,
    assert_same_answer,
    client,
    running_sidecar,
)
from tests.server.test_step_batch import batch_request

pytestmark = pytest.mark.timeout(300)
OK = grpc.StatusCode.OK
FP = grpc.StatusCode.FAILED_PRECONDITION
NF = grpc.StatusCode.NOT_FOUND
IA = grpc.StatusCode.INVALID_ARGUMENT


# -- the table and its lock -------------------------------------------------------------------------
def _session(table: SessionTable, sid: str = "s") -> HotSession:
    return HotSession(table, "t", sid, handle=1, cfg=PolicyConfig(**SMALL).validate())


def test_lock_is_fifo_and_survives_cancelled_waiters() -> None:
    async def body() -> None:
        table = SessionTable(capacity=2)
        hs = _session(table)
        order: list[str] = []
        await hs.lock.acquire()
        assert hs.lock.locked() and table.col["in_flight"][hs.slot]

        async def take(name: str) -> None:
            async with hs.lock:
                order.append(name)

        a = asyncio.ensure_future(take("a"))
        b = asyncio.ensure_future(take("b"))
        c = asyncio.ensure_future(take("c"))
        await asyncio.sleep(0)
        assert table.waiting == {hs.slot}
        b.cancel()
        await asyncio.sleep(0)
        hs.lock.release()
        await asyncio.gather(a, c, return_exceptions=True)
        assert order == ["a", "c"] and b.cancelled()
        assert not hs.lock.locked() and not table.waiting
        with pytest.raises(RuntimeError):
            hs.lock.release()

    arun(body())


def test_batch_lock_takes_all_or_nothing() -> None:
    async def body() -> None:
        table = SessionTable(capacity=1)  # grows on the second session
        x, y, z = (_session(table, s) for s in "xyz")
        slots = np.array([x.slot, y.slot, z.slot])
        assert table.capacity >= 3 and len(table) == 3
        await y.lock.acquire()
        assert not table.try_lock(slots)
        assert not x.lock.locked() and not z.lock.locked()  # nothing taken
        waiter = asyncio.ensure_future(y.lock.acquire())
        await asyncio.sleep(0)
        y.lock.release()  # y is free, but its waiter comes first
        assert not table.try_lock(slots)
        await waiter
        y.lock.release()
        assert table.try_lock(slots) and all(s.lock.locked() for s in (x, y, z))

    arun(body())


def test_detached_session_keeps_its_values_and_its_lock() -> None:
    async def body() -> None:
        table = SessionTable(capacity=4)
        old = _session(table, "old")
        old.step, old.count, old.checksum = 7, 5, 2**64 - 3
        await old.lock.acquire()
        waiter = asyncio.ensure_future(old.lock.acquire())
        await asyncio.sleep(0)
        slot = old.slot
        old.detach()
        new = _session(table, "new")  # reuses the freed slot
        assert new.slot == slot and new.step == 0 and not new.lock.locked()
        assert (old.step, old.count, old.checksum) == (7, 5, 2**64 - 3)
        assert old.lock.locked()  # still held by its owner, not by the new session
        old.lock.release()
        await waiter
        assert old.lock.locked() and not new.lock.locked()
        new.step = 3
        assert old.step == 7

    arun(body())


# -- the differential stream ---------------------------------------------------------------------
class Model:
    """The step protocol as the per-session path implemented it, one plain object per session:
    which code an RPC gets, and what a success answers (the engine side is :class:`Reference`)."""

    def __init__(self) -> None:
        self.open: dict[str, SimSession] = {}
        self.answers: dict[str, pb.SessionResult] = {}  # the last applied step's answer
        self.sent: dict[str, Planned] = {}  # its payload

    def code(self, entries: list[tuple[SimSession, Planned]]) -> grpc.StatusCode:
        ids = [s.session_id for s, _ in entries]
        if len(set(ids)) != len(ids):
            return IA
        if any(sid not in self.open for sid in ids):
            return NF
        for sim, p in entries:  # retries, then order, then the worker's state (request order each)
            if p.msg.step == sim.ws.step > 0 and sim.session_id in self.answers and \
                    p.msg.SerializeToString() != self.sent[sim.session_id].msg.SerializeToString():
                return FP
        fresh = [(s, p) for s, p in entries if not self._retry(s, p)]
        if any(p.msg.step != s.ws.step + 1 for s, p in fresh):
            return FP
        if any((p.msg.retained_count, p.msg.retained_checksum) != (s.ws.retained_count, s.ws.retained_checksum)
               for s, p in fresh):
            return FP
        return OK

    def _retry(self, sim: SimSession, p: Planned) -> bool:
        return p.msg.step == sim.ws.step > 0 and sim.session_id in self.answers


async def _send(c: AsyncNexusClient, entries: list[tuple[SimSession, Planned]], columnar: bool
                ) -> list[pb.SessionResult]:
    if not columnar:
        return await c.step([p.msg for _, p in entries])
    sims = [s for s, _ in entries]
    plans = [p for _, p in entries]
    saved = [(s.ws.retained_count, s.ws.retained_checksum) for s in sims]
    for s, p in entries:  # the batch form reads the worker's state from its WorkerSession
        s.ws.retained_count, s.ws.retained_checksum = p.msg.retained_count, p.msg.retained_checksum
    try:
        req = batch_request(sims, plans)
    finally:
        for s, (count, check) in zip(sims, saved, strict=True):
            s.ws.retained_count, s.ws.retained_checksum = count, check
    answer = read_answer(await c.step_batch(req), req, [s.cfg.groups for s in sims])
    return [answer.session_result(b, s.session_id) for b, s in enumerate(sims)]


def _changed(p: Planned) -> Planned:
    msg = pb.SessionStep()
    msg.CopyFrom(p.msg)
    msg.retained_count += 1
    return Planned(msg, p.inp, p.new)


async def _stream(seed: int, rounds: int) -> dict[str, int]:
    rng = random.Random(seed)
    model, ref = Model(), Reference()
    seen: dict[str, int] = {}
    next_id = 0
    async with running_sidecar() as sc:
        c = client(sc)

        async def open_one() -> None:
            nonlocal next_id
            sim = SimSession(f"s{next_id}", {**SMALL, "seed": next_id, "groups": rng.choice((1, 2))}, seed=next_id)
            next_id += 1
            await c.open_session(sim.session_id, sim.config)
            model.open[sim.session_id] = sim
            ref.open(sim)

        for _ in range(4):
            await open_one()
        for r in range(rounds):
            op = rng.random()
            names = sorted(model.open)
            if op < 0.08 and len(model.open) < 10:
                await open_one()
                continue
            if op < 0.13 and len(names) > 2:  # close
                sid = rng.choice(names)
                await c.close_session(sid)
                del model.open[sid]
                model.answers.pop(sid, None)
                continue
            if op < 0.20 and names:  # resync from the worker's truth
                sim = model.open[rng.choice(names)]
                sim.ws.positions = list(sim.retained)
                h = ref.handles[sim.session_id]
                seeded = reseed(sim.cfg, ref.engine.snapshot(h), list(sim.retained), sim.ws.step)
                ref.handles[sim.session_id] = ref.engine.restore(seeded.state)
                ref.engine.close(h)
                resp = await c.resync(sim.ws)
                assert (resp.retained_count, resp.retained_checksum) == (sum(int(x.numel()) for x in sim.retained),
                                                                        checksum_of(sim.retained))
                model.answers.pop(sim.session_id, None)
                seen["resync"] = seen.get("resync", 0) + 1
                continue
            picked = rng.sample(names, rng.randint(1, len(names)))
            entries = [(model.open[sid], model.open[sid].make()) for sid in picked]
            fault = rng.choice(("none", "none", "none", "retry", "retry_changed", "skip", "state", "unknown",
                                "duplicate", "concurrent"))
            retriable = [sid for sid in picked if sid in model.answers]
            if fault in ("retry", "retry_changed", "concurrent") and retriable:
                sid = rng.choice(retriable)
                j = picked.index(sid)
                old = model.sent[sid]
                entries[j] = (entries[j][0], old if fault != "retry_changed" else _changed(old))
            elif fault == "skip":
                sim = entries[0][0]
                entries[0] = (sim, sim.make(step=sim.ws.step + 2))
            elif fault == "state":
                entries[-1] = (entries[-1][0], _changed(entries[-1][1]))
            elif fault == "unknown":
                ghost = SimSession("ghost", dict(SMALL))
                entries.append((ghost, ghost.make()))
            elif fault == "duplicate":
                entries.append(entries[0])
            expected = model.code(entries)
            columnar = rng.random() < 0.5
            where = f"round {r} ({fault}, {'StepBatch' if columnar else 'Step'})"
            try:
                if fault == "concurrent" and expected == OK:
                    # The same RPC twice at once: one waits for the other's locks (the slow path of the
                    # batch lock), then answers its steps as retries, with the same answers.
                    results, again = await asyncio.gather(_send(c, entries, columnar), _send(c, entries, columnar))
                    assert [x.SerializeToString() for x in results] == [x.SerializeToString() for x in again], where
                else:
                    results = await _send(c, entries, columnar)
                got = OK
            except SidecarError as exc:
                got = exc.code
            assert got == expected, f"{where}: got {got}, expected {expected}"
            seen[f"{fault}:{expected.name}"] = seen.get(f"{fault}:{expected.name}", 0) + 1
            if got != OK:
                continue
            for (sim, p), res in zip(entries, results, strict=True):
                sid = sim.session_id
                if model._retry(sim, p):
                    assert res.SerializeToString() == model.answers[sid].SerializeToString(), f"{where}: {sid} retry"
                    continue
                assert_same_answer(res, ref.step(sim, p), f"{where}: {sid} step {p.msg.step}")
                sim.apply(p, res)
                assert res.retained_checksum == checksum_of(sim.retained), where
                model.answers[sid], model.sent[sid] = res, p
        # The table agrees with what the workers hold.
        for sid, sim in model.open.items():
            snap = await c.get_session(sid)
            assert (snap.step, snap.retained_count, snap.retained_checksum) == \
                   (sim.ws.step, sim.ws.retained_count, sim.ws.retained_checksum), sid
        assert len(sc.sessions.table) == len(sc.sessions.hot_sessions())
        await c.close()
    return seen


@pytest.mark.parametrize("seed", [1, 2])
def test_random_streams_get_the_protocols_answers_and_codes(seed: int) -> None:
    seen = arun(_stream(seed, rounds=70), timeout=280)
    # The stream exercised what it is about (with these seeds): successes, every refusal, retries.
    assert seen.get("none:OK", 0) > 5
    assert any(k.startswith("retry:OK") for k in seen), seen
    for code in ("FAILED_PRECONDITION", "NOT_FOUND", "INVALID_ARGUMENT"):
        assert any(k.endswith(code) for k in seen), (code, seen)


def test_table_grows_and_reuses_slots_under_many_sessions() -> None:
    table = SessionTable(capacity=2)
    cfg = PolicyConfig(**SMALL).validate()
    live = [HotSession(table, "t", f"s{i}", handle=i, cfg=cfg, step=i) for i in range(40)]
    for hs in live[::2]:
        hs.detach()
    again = [HotSession(table, "t", f"n{i}", handle=100 + i, cfg=cfg) for i in range(20)]
    assert len(table) == 40
    assert sorted(hs.slot for hs in again) == sorted(hs.slot for hs in live[::2])
    assert [hs.step for hs in live[1::2]] == list(range(1, 40, 2))
    assert [hs.step for hs in live[::2]] == list(range(0, 40, 2))  # detached: their own values
    assert all(hs.step == 0 and hs.handle == 100 + i for i, hs in enumerate(again))
    assert torch.equal(torch.from_numpy(table.col["handle"][[hs.slot for hs in again]]), torch.arange(100, 120))
