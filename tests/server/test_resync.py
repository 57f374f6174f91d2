"""Resync: a worker re-seeds a sidecar that is behind it (failover to an older checkpoint) or
lost its session, then continues; known positions keep their state, the others are newcomers."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
import torch
from nexus_client.client import resync_request
from nexus_client.packing import checksum_of
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import tensor_to_proto
from nexus_sidecar.engine import Engine
from nexus_sidecar.server.app import Sidecar
from nexus_sidecar.server.checkpoint import load
from nexus_sidecar.server.resync import reseed
from nexus_sidecar.server.stores import MemoryStore

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
    sample_value,
    settings,
    target,
)

FP, NF, IA = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT


def _track(sim: SimSession) -> None:
    sim.ws.positions = [r.clone() for r in sim.retained]


def test_a_sidecar_behind_the_worker_is_resynced_and_the_stream_continues(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nexus_sidecar.sessions")

    async def body() -> None:
        store = MemoryStore()
        a = Sidecar(settings(checkpoint_every=4), store=store)
        b = Sidecar(settings(checkpoint_every=4), store=store)
        await a.start()
        await b.start()
        try:
            sim = SimSession("s1", config={**SMALL, "groups": 2}, seed=2)
            ca, cb = client(a), client(b)
            await ca.open_session("s1", sim.config)
            await drive(ca, [sim], 6)  # A checkpointed step 4; steps 5-6 only in A's hot state
            await asyncio.sleep(0.2)  # the background checkpoint
            rec = await store.get("default", "s1")
            stored = load(rec.blob, rec.delta).checkpoint
            assert stored.step == 4
            nxt = sim.make()
            msg = await expect_error(cb.step([nxt.msg]), FP)  # B resumed at step 4
            assert "expected step 5" in msg, msg
            _track(sim)
            resp = await cb.resync(sim.ws)
            known = sum(int(torch.isin(w, s.pos).sum()) for w, s in zip(sim.retained, stored.state.groups,
                                                                         strict=True))
            total = sum(r.numel() for r in sim.retained)
            assert (resp.step, resp.previous_step, resp.known, resp.admitted) == (6, 4, known, total - known)
            assert 0 < known < total
            assert resp.retained_count == total and resp.retained_checksum == checksum_of(sim.retained)
            # From here B must answer as an engine restored from the same re-seeded state.
            ref = Engine(torch.device("cpu"))
            h = ref.restore(reseed(sim.cfg, stored.state, sim.retained, 6).state)
            for _ in range(5):
                p = sim.make()
                r = (await cb.step([p.msg]))[0]
                assert_same_answer(r, ref.step({h: p.inp})[h], f"after resync, step {p.msg.step}")
                sim.apply(p, r)
            snap = await cb.get_session("s1")
            assert snap.step == 11 and snap.retained_checksum == sim.ws.retained_checksum
            text = (await http(b).get("/metrics")).text
            assert sample_value(text, "nexus_sessions_resynced_total", tenant="default") == 1
            await ca.close()
            await cb.close()
        finally:
            await b.stop(grace=0.5)  # B first: both share the store, and the first stop closes it
            await a.stop(grace=0.5)

    arun(body())
    lines = [r.getMessage() for r in caplog.records if "resynced session default/s1" in r.getMessage()]
    assert lines and "at step 6 (sidecar was at step 4)" in lines[0], lines


def test_a_lost_session_is_recreated_from_the_worker_with_its_config() -> None:
    async def main() -> None:
        sc = Sidecar(settings())
        await sc.start()
        try:
            c = client(sc)
            sim = SimSession("gone", seed=5)
            ref = Reference()
            await c.open_session("gone", sim.config)
            ref.open(sim)
            await drive(c, [sim], 4, ref)
            await c.close_session("gone")  # stands in for a store that lost it
            p = sim.make()
            await expect_error(c.step([p.msg]), NF)
            _track(sim)
            msg = await expect_error(c.resync(sim.ws), IA)
            assert msg.startswith("config: ") and "send its config" in msg, msg
            resp = await c.resync(sim.ws, sim.config)
            assert (resp.step, resp.previous_step, resp.known) == (4, 0, 0)
            assert resp.admitted == sum(r.numel() for r in sim.retained)
            fresh = Engine(torch.device("cpu"))
            h = fresh.restore(reseed(sim.cfg, None, sim.retained, 4).state)
            for _ in range(3):
                p = sim.make()
                r = (await c.step([p.msg]))[0]
                assert_same_answer(r, fresh.step({h: p.inp})[h], "recreated")
                sim.apply(p, r)
            await c.close()
        finally:
            await sc.stop(grace=0.5)

    arun(main())


@pytest.mark.parametrize(("mutate", "field", "why"), [
    (lambda req: req.retained.pop(), "retained", "1 groups sent, the session has 2"),
    (lambda req: req.retained[0].CopyFrom(tensor_to_proto(torch.tensor([5, 3]))), "retained[0]", "ascending"),
    (lambda req: req.retained[1].CopyFrom(tensor_to_proto(torch.tensor([2**62]))), "retained[1]", "2^62"),
    (lambda req: req.retained[0].CopyFrom(tensor_to_proto(torch.arange(100))), "retained[0]", "budget + slack"),
    (lambda req: req.retained[0].CopyFrom(tensor_to_proto(torch.ones(3))), "retained[0]", "int32 or int64"),
])
def test_resync_validates_the_worker_positions(mutate: object, field: str, why: str) -> None:
    async def main() -> None:
        sc = Sidecar(settings())
        await sc.start()
        try:
            c = client(sc)
            sim = SimSession("v", config={**SMALL, "groups": 2})
            await c.open_session("v", sim.config)
            await drive(c, [sim], 2)
            _track(sim)
            req = resync_request(sim.ws)
            mutate(req)  # type: ignore[operator]
            async with grpc.aio.insecure_channel(target(sc)) as ch:
                call = ch.unary_unary("/nexus.v1.EvictionService/Resync",
                                      request_serializer=pb.ResyncRequest.SerializeToString,
                                      response_deserializer=pb.ResyncResponse.FromString)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(req, timeout=10)
            assert err.value.code() == IA and err.value.details().startswith(f"{field}: ")
            assert why in err.value.details(), err.value.details()
            await drive(c, [sim], 1)  # untouched
            await c.close()
        finally:
            await sc.stop(grace=0.5)

    arun(main())
