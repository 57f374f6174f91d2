"""A real Prometheus server scrapes the sidecar's /metrics: the tenant-labelled token counter
arrives with the exact number of tokens sent, and the target is up."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.server.conftest import KEYS, SimSession, arun, client, drive, running_sidecar

pytestmark = pytest.mark.timeout(90)


async def _query(api: httpx.AsyncClient, promql: str) -> list[dict[str, Any]]:
    try:
        r = await api.get("/api/v1/query", params={"query": promql})
    except httpx.TransportError:
        return []  # prometheus not listening yet
    if r.status_code != 200:
        return []
    return r.json()["data"]["result"]


def test_prometheus_scrapes_tenant_token_counts(keys_file, prometheus_factory) -> None:
    async def body() -> None:
        async with running_sidecar(keys_file=keys_file) as sc:
            acme, globex = client(sc, KEYS["acme"]), client(sc, KEYS["globex"])
            a, g = SimSession("p1", seed=1), SimSession("p1", seed=2)
            await acme.open_session("p1", a.config)
            await globex.open_session("p1", g.config)
            await drive(acme, [a], 6)
            await drive(globex, [g], 2)
            sent = {"acme": a.next_pos, "globex": g.next_pos}
            assert sent["acme"] != sent["globex"]

            prom = prometheus_factory(sc.http_port)
            deadline = time.monotonic() + 30
            got: dict[str, float] = {}
            up: list[dict[str, Any]] = []
            async with httpx.AsyncClient(base_url=prom.url, timeout=5) as api:
                while time.monotonic() < deadline:
                    assert prom.proc.poll() is None, f"prometheus exited:\n{prom.log_tail()}"
                    got = {s["metric"].get("tenant", ""): float(s["value"][1])
                           for s in await _query(api, "sum by (tenant) (nexus_tokens_seen_total)")}
                    up = await _query(api, 'up{job="nexus"}')
                    if got == sent and up and up[0]["value"][1] == "1":
                        break
                    await asyncio.sleep(0.5)
                else:
                    raise AssertionError(f"prometheus never reported {sent} with up == 1 within 30 s: "
                                         f"got {got}, up {up}\n{prom.log_tail()}")
                series = await _query(api, 'nexus_tokens_seen_total{tenant="acme", policy="nexus"}')
                assert series[0]["metric"]["job"] == "nexus" and float(series[0]["value"][1]) == sent["acme"]
                assert "session_id" not in series[0]["metric"]
            await acme.close()
            await globex.close()

    arun(body(), 80)
