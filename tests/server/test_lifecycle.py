"""grpc.health.v1, server reflection, and draining (UNAVAILABLE, NOT_SERVING, checkpoint on stop)
against an in-process sidecar, with a real redis-server made slow for real (CLIENT PAUSE)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from nexus_sidecar.server.checkpoint import load

from tests.server.conftest import SimSession, arun, client, drive, expect_error, http, running_sidecar, target

pytestmark = pytest.mark.timeout(90)
SERVICE = "nexus.v1.EvictionService"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(tgt: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(tgt) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status


def _reflected_services(tgt: str) -> list[str]:
    with grpc.insecure_channel(tgt) as ch:
        return list(ProtoReflectionDescriptorDatabase(ch).get_services())


def test_health_and_reflection() -> None:
    async def body() -> None:
        async with running_sidecar() as sc:
            tgt = target(sc)
            assert await _health(tgt) == SERVING
            assert await _health(tgt, SERVICE) == SERVING
            services = await asyncio.to_thread(_reflected_services, tgt)
            assert SERVICE in services and "grpc.health.v1.Health" in services, services
            stopping = asyncio.create_task(sc.stop(grace=0.5))
            await stopping
        # After stop the port no longer answers.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _health(tgt)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    arun(body())


def test_draining_refuses_new_work_and_checkpoints(redis_factory) -> None:
    """While stop() checkpoints (Redis writes paused for real), health says NOT_SERVING, /readyz
    says draining, write RPCs get UNAVAILABLE naming the drain; afterwards Redis holds the state."""
    rp = redis_factory()

    async def body() -> None:
        async with running_sidecar(store=rp.url, checkpoint_every=0, store_timeout_s=5) as sc:
            c = client(sc)
            sims = [SimSession("d1", seed=1), SimSession("d2", seed=2)]
            for s in sims:
                await c.open_session(s.session_id, s.config)
            await drive(c, sims, 3)
            with rp.client() as r:
                # Opening claimed owner epochs; no state is written before shutdown.
                assert not [k for k in r.keys("*") if r.hexists(k, "blob")], \
                    "checkpoint_every=0 must not write before shutdown"
                r.execute_command("CLIENT", "PAUSE", "1500", "WRITE")  # writes (the CAS script) wait
            stopping = asyncio.create_task(sc.stop(grace=0.5))
            for _ in range(200):
                if await _health(target(sc)) == NOT_SERVING:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("health did not turn NOT_SERVING after stop() began")
            assert await _health(target(sc), SERVICE) == NOT_SERVING
            assert not stopping.done(), "the paused Redis should hold the shutdown checkpoint"
            UN = grpc.StatusCode.UNAVAILABLE
            msg = await expect_error(c.step([sims[0].make().msg]), UN)
            assert "draining" in msg, msg
            msg = await expect_error(c.open_session("new", sims[0].config), UN)
            assert "draining" in msg, msg
            async with http(sc) as h:
                r = await h.get("/readyz")
                assert r.status_code == 503 and r.json()["draining"] is True, r.text
            await c.close()
            await asyncio.wait_for(stopping, 20)
        with rp.client() as r:
            for s in sims:
                raw = r.hgetall(f"nexus:{{default:{s.session_id}}}:state")
                assert int(raw[b"step"]) == 3, raw.keys()
                cp = load(raw[b"blob"], raw.get(b"delta")).checkpoint
                assert cp.step == 3 and cp.checksum == s.ws.retained_checksum
                assert cp.state.groups[0].pos.tolist() == s.retained[0].tolist()

    arun(body())
