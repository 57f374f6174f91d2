"""Truthful health: gRPC health and /readyz agree both ways; nexus_degraded is 1 from the first
store operation that cannot reach Redis (the start-up ping included); /readyz answers within 1 s
with Redis hung (SIGSTOP); the HTTP side port answers 404/401 without tracebacks and keeps the
connection alive."""

from __future__ import annotations

import asyncio
import http.client as httplib
import logging
import os
import signal
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nexus_sidecar.bench.procs import free_port

from tests.server.conftest import (
    KEYS,
    SimSession,
    arun,
    client,
    drive,
    http,
    running_sidecar,
    sample_value,
    target,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def _grpc_health(tgt: str) -> int:
    async with grpc.aio.insecure_channel(tgt) as ch:
        return (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)).status


async def _agree(sc, want_ready: bool) -> bool:  # type: ignore[no-untyped-def]
    async with http(sc) as h:
        r = await h.get("/readyz")
    status = await _grpc_health(target(sc))
    return (r.status_code == 200) == want_ready and (status == SERVING) == want_ready


def test_grpc_health_and_readyz_agree_through_a_redis_outage(redis_factory) -> None:
    rp = redis_factory()
    procs: list[subprocess.Popen[bytes]] = []

    async def body() -> None:
        async with running_sidecar(store=rp.url, store_timeout_s=0.5) as sc:
            assert await _agree(sc, True)
            rp.stop()
            await wait_until(lambda: _agree(sc, False), 5, "both NOT ready")
            async with http(sc) as h:
                assert sample_value((await h.get("/metrics")).text, "nexus_degraded") == 1
            procs.append(rp.restart("--appendonly", "no"))
            await wait_until(lambda: _agree(sc, True), 5, "both ready again")
            async with http(sc) as h:
                assert sample_value((await h.get("/metrics")).text, "nexus_degraded") == 0

    try:
        arun(body())
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


def test_degraded_from_the_first_failed_op_even_at_start_up() -> None:
    async def body() -> None:
        dead = f"redis://127.0.0.1:{free_port()}/0"
        async with running_sidecar(store=dead, store_timeout_s=0.3) as sc:
            async with http(sc) as h:  # only the start-up ping has touched the store so far
                assert sample_value((await h.get("/metrics")).text, "nexus_degraded") == 1
                assert sample_value((await h.get("/metrics")).text, "nexus_store_errors_total", op="ping") >= 1
            assert await _grpc_health(target(sc)) == NOT_SERVING

    arun(body())


def test_readyz_answers_within_a_second_with_redis_hung(redis_factory) -> None:
    rp = redis_factory()

    async def body() -> None:
        async with running_sidecar(store=rp.url, store_timeout_s=2.0) as sc:
            c = client(sc)
            sim = SimSession("h1")
            await c.open_session("h1", sim.config)
            assert await _agree(sc, True)
            os.kill(rp.proc.pid, signal.SIGSTOP)
            try:
                async with http(sc) as h:
                    for _ in range(3):
                        t0 = time.monotonic()
                        r = await h.get("/readyz")
                        took = time.monotonic() - t0
                        assert r.status_code == 503 and took < 1.0, (r.status_code, took)
                        assert "within" in r.json()["store"]
                    assert sample_value((await h.get("/metrics")).text, "nexus_degraded") == 1
                assert await _grpc_health(target(sc)) == NOT_SERVING
            finally:
                os.kill(rp.proc.pid, signal.SIGCONT)
            await wait_until(lambda: _agree(sc, True), 10, "ready after SIGCONT")
            await drive(c, [sim], 1)
            await c.close()

    arun(body())


def test_http_errors_without_tracebacks_and_keepalive_kept(keys_file, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def body() -> None:
        async with running_sidecar(keys_file=keys_file) as sc:
            def hammer() -> tuple[list[int], bool]:
                conn = httplib.HTTPConnection("127.0.0.1", sc.http_port, timeout=10)
                codes, same = [], True
                conn.request("GET", "/healthz")
                conn.getresponse().read()
                sock = conn.sock
                for i in range(300):
                    key = KEYS["acme"] if i % 3 else "wrong-key-0123456789"
                    conn.request("GET", f"/v1/sessions/unknown-{i}", headers={"Authorization": f"Bearer {key}"})
                    resp = conn.getresponse()
                    resp.read()
                    codes.append(resp.status)
                    same = same and conn.sock is sock and resp.getheader("connection", "") != "close"
                conn.close()
                return codes, same

            codes, same = await asyncio.to_thread(hammer)
            assert sorted(set(codes)) == [401, 404] and codes.count(401) == 100
            assert same, "the keep-alive connection was closed"

    arun(body())
    noisy = [r for r in caplog.records if r.exc_info or "Exception in ASGI" in r.getMessage()]
    assert not noisy, [r.getMessage() for r in noisy][:3]


def test_metrics_can_require_a_key(keys_file) -> None:
    async def body() -> None:
        async with running_sidecar(keys_file=keys_file, metrics_require_key=True) as sc:
            async with http(sc) as anon:
                assert (await anon.get("/metrics")).status_code == 401
                assert (await anon.get("/healthz")).status_code == 200  # probes stay open
            async with http(sc, "wrong-key-0123456789") as bad:
                assert (await bad.get("/metrics")).status_code == 401
            async with http(sc, KEYS["acme-ro"]) as ro:  # any valid key, read-only is enough
                r = await ro.get("/metrics")
                assert r.status_code == 200 and "nexus_degraded" in r.text
        # No keys: refuse, never expose.
        async with running_sidecar(metrics_require_key=True) as sc, http(sc) as anon:
            assert (await anon.get("/metrics")).status_code == 401
        # The default: open, as before.
        async with running_sidecar(keys_file=keys_file) as sc, http(sc) as anon:
            assert (await anon.get("/metrics")).status_code == 200

    arun(body())
