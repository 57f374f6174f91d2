"""The router's membership sources and its move paths, against real in-process sidecars.

(The kill drill with three sidecar processes and Redis is ``test_router_drill.py``.)
"""

from __future__ import annotations

import asyncio

import pytest
from nexus_client.routing import AsyncNexusRouter, DnsEndpoints, HashRing, NexusRouter, SessionLost, StaticEndpoints

from tests.client.test_client import running_sidecar
from tests.server.conftest import SMALL, Reference, SimSession, assert_same_answer


def test_dns_endpoints_resolve_a_records() -> None:
    assert asyncio.run(DnsEndpoints("localhost", 5051).resolve()) == ["127.0.0.1:5051"]
    assert asyncio.run(DnsEndpoints("no-such-host.invalid", 5051).resolve()) == []  # no crash, no endpoint
    assert asyncio.run(AsyncNexusRouter("127.0.0.1:5051").source.resolve()) == ["127.0.0.1:5051"]  # one target


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


def test_affinity_keeps_a_workers_sessions_together_and_placement_scales() -> None:
    """Pinning 20,000 keys stays fast (incremental loads, not a rescan per pin) and the bounded
    loads hold; with an affinity key, a worker's sessions share one replica and one Step RPC."""
    import time

    eps = [f"10.0.0.{i}:50051" for i in range(1, 6)]
    router = AsyncNexusRouter(eps)
    router._ring = HashRing(eps)  # what refresh() builds from the list
    t0 = time.perf_counter()
    for i in range(20_000):
        router._place(f"key-{i}")
    assert time.perf_counter() - t0 < 10.0
    load = router._load
    assert sum(load.values()) == 20_000 and max(load.values()) <= 1.1 * 20_000 / 5 + 1
    assert min(load.values()) >= 0.8 * 20_000 / 5
    with running_sidecar() as a, running_sidecar() as b, \
            NexusRouter([a.target, b.target], affinity=lambda sid: sid.split("/")[0]) as router:
        sims = [SimSession(f"w{w}/s{i}", config=dict(SMALL), seed=10 * w + i) for w in range(6) for i in range(3)]
        for sim in sims:
            router.open_session(sim.session_id, sim.config)
        for w in range(6):
            assert len({router.endpoint_of(f"w{w}/s{i}") for i in range(3)}) == 1
        counts = sorted(router.distribution().values())  # whole workers: 3 sessions each, <= 4 per replica
        assert sum(counts) == 18 and all(c % 3 == 0 for c in counts) and counts[0] >= 6
        plans = [sim.make() for sim in sims]
        results = router.step([p.msg for p in plans])
        assert [r.session_id for r in results] == [s.session_id for s in sims] and all(r.step == 1 for r in results)


def test_resync_from_the_worker_when_replay_cannot_reach_back(redis_server) -> None:
    """The same move as above with a 2-step buffer, but the worker lends the router its positions:
    the new replica is re-seeded by Resync, and the stream goes on within the budget."""
    from nexus_client.packing import WorkerSession

    with running_sidecar(store=redis_server.url, checkpoint_every=0) as a, \
            running_sidecar(store=redis_server.url, checkpoint_every=0) as b:
        source = StaticEndpoints([a.target])
        sim = SimSession("resync-1", config=dict(SMALL))

        def truth(sid: str) -> WorkerSession:
            assert sid == sim.session_id
            return WorkerSession(sid, sim.cfg.groups, step=sim.ws.step, retained_count=sim.ws.retained_count,
                                 retained_checksum=sim.ws.retained_checksum, positions=list(sim.retained))

        with NexusRouter(source, replay=2, refresh_s=0.0, worker_sessions=truth) as router:
            router.open_session(sim.session_id, sim.config)
            for _ in range(5):
                planned = sim.make()
                (result,) = router.step([planned.msg])
                sim.apply(planned, result)
            source.set([b.target])
            for step in range(6, 10):
                before = sim.retained[0]
                planned = sim.make()
                (result,) = router.step([planned.msg])
                assert result.step == step
                sim.apply(planned, result)
                held = set(before.tolist()) | set(planned.new.tolist())
                assert set(sim.retained[0].tolist()) <= held and sim.retained[0].numel() <= SMALL["budget"]
            assert router.endpoint_of("resync-1") == b.target
            assert router.stats.resynced == 1 and router.stats.replayed_steps == 0
            assert router.get_session("resync-1").step == 9
