"""The router's membership sources and its move paths, against real in-process sidecars.

(The kill drill with three sidecar processes and Redis is ``test_router_drill.py``.)
"""

from __future__ import annotations

import asyncio

import pytest
from nexus_client.routing import DnsEndpoints, NexusRouter, SessionLost, StaticEndpoints

from tests.client.test_client import running_sidecar
from tests.server.conftest import SMALL, Reference, SimSession, assert_same_answer


def test_dns_endpoints_resolve_a_records() -> None:
    assert asyncio.run(DnsEndpoints("localhost", 5051).resolve()) == ["127.0.0.1:5051"]
    assert asyncio.run(DnsEndpoints("no-such-host.invalid", 5051).resolve()) == []  # no crash, no endpoint


def test_sync_router_over_dns_name() -> None:
    with running_sidecar() as sc, NexusRouter(DnsEndpoints("localhost", int(sc.target.split(":")[1]))) as router:
        sim, ref = SimSession("dns-1", config=dict(SMALL)), Reference()
        router.open_session(sim.session_id, sim.config)
        ref.open(sim)
        for _ in range(6):
            planned = sim.make()
            (result,) = router.step([planned.msg])
            assert_same_answer(result, ref.step(sim, planned))
            sim.apply(planned, result)
        assert router.distribution() == {sc.target: 1} and router.endpoint_of("dns-1") == sc.target
        assert router.close_session("dns-1") == 6


@pytest.mark.parametrize("replay", [8, 2])
def test_endpoint_leaving_moves_sessions_by_replay(redis_server, replay: int) -> None:
    with running_sidecar(store=redis_server.url, checkpoint_every=0) as a, \
            running_sidecar(store=redis_server.url, checkpoint_every=0) as b:
        source = StaticEndpoints([a.target])
        with NexusRouter(source, replay=replay, refresh_s=0.0) as router:
            sim, ref = SimSession("move-1", config=dict(SMALL)), Reference()
            router.open_session(sim.session_id, sim.config)
            ref.open(sim)
            for _ in range(5):
                planned = sim.make()
                (result,) = router.step([planned.msg])
                ref.step(sim, planned)
                sim.apply(planned, result)
            assert router.endpoint_of("move-1") == a.target
            source.set([b.target])  # e.g. A's pod left the headless Service's DNS answer
            planned = sim.make()
            if replay < 5:  # the store has nothing and the buffer only steps 4..5: refuse, clearly
                with pytest.raises(SessionLost, match=r"store has step 0, the worker is at step 5"):
                    router.step([planned.msg])
                return
            (result,) = router.step([planned.msg])
            assert_same_answer(result, ref.step(sim, planned), "step 6 on B after replaying 1..5")
            assert router.endpoint_of("move-1") == b.target
            assert router.stats.reopened == 1 and router.stats.replayed_steps == 5 and router.stats.moves == 1
