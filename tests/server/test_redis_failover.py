"""Durability with a real redis-server (and a real 3-node Redis Cluster): resume in another process,
CAS fencing of stale replicas, failover to an older checkpoint, graceful SIGTERM checkpoints.

Sidecar processes are real ``nexus-sidecar serve`` subprocesses (bench.procs.sidecar_process);
the reference answers come from an uninterrupted in-process Engine fed the same inputs.
"""

from __future__ import annotations

import signal

import grpc
import pytest
import redis
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_sidecar.bench.procs import sidecar_process
from nexus_sidecar.server.checkpoint import load
from nexus_sidecar.server.stores import Fenced, RedisStore

from tests.server.conftest import (
    Planned,
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
    target,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)
FP = grpc.StatusCode.FAILED_PRECONDITION


def _key(session_id: str, tenant: str = "default") -> str:
    return f"nexus:{{{tenant}:{session_id}}}:state"


def _stored_step(r: redis.Redis, session_id: str) -> int | None:
    raw = r.hget(_key(session_id), "step")
    return None if raw is None else int(raw)


def _args(url: str, every: int) -> tuple[str, ...]:
    return ("--device", "cpu", "--store", url, "--checkpoint-every", str(every), "--max-delay-us", "200")


async def _step_one(tgt: str, sim: SimSession, ref: Reference | None = None) -> tuple[Planned, pb.SessionResult]:
    c = client(tgt)
    p = sim.make()
    r = (await c.step([p.msg]))[0]
    if ref is not None:
        assert_same_answer(r, ref.step(sim, p), f"{sim.session_id} step {p.msg.step}")
    sim.apply(p, r)
    await c.close()
    return p, r


def test_resume_in_another_process_after_sigterm(redis_server) -> None:
    sim = SimSession("mover", seed=5)
    ref = Reference()
    ref.open(sim)
    answers: dict[int, tuple[Planned, pb.SessionResult]] = {}

    with sidecar_process(*_args(redis_server.url, 1)) as a:
        async def on_a() -> None:
            c = client(a.target)
            await c.open_session(sim.session_id, sim.config)
            await c.close()
            for _ in range(4):
                p, r = await _step_one(a.target, sim, ref)
                answers[r.step] = (p, r)
        arun(on_a())
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(timeout=30) == 0, "SIGTERM must drain and exit 0"
    with redis_server.client() as r:
        assert _stored_step(r, sim.session_id) == 4

    with sidecar_process(*_args(redis_server.url, 1)) as b:
        async def on_b() -> None:
            c = client(b.target)
            # The worker re-opens (idempotent): B resumes the session at A's last step.
            assert (await c.open_session(sim.session_id, sim.config)).step == 4
            # A retry of A's last step gets A's exact answer (stored with the checkpoint).
            p4, r4 = answers[4]
            assert (await c.step([p4.msg]))[0].SerializeToString() == r4.SerializeToString()
            # The next steps equal an uninterrupted engine's.
            await drive(c, [sim], 4, ref)
            assert (await c.get_session(sim.session_id)).step == 8
            await c.close()
        arun(on_b())


def test_cas_fences_a_stale_replica(redis_server) -> None:
    """A and B share Redis. B takes the session over and advances it; A (still running, still
    holding the older state) computes a step and tries to checkpoint it: refused, counted, and
    the stored state stays B's. A direct stale put through A's store is refused too."""

    async def body() -> None:
        async with running_sidecar(store=redis_server.url, checkpoint_every=1) as a, \
                running_sidecar(store=redis_server.url, checkpoint_every=1) as b:
            raw = redis.asyncio.Redis.from_url(redis_server.url)
            sim = SimSession("contested", seed=9)
            ref = Reference()
            ref.open(sim)
            c = client(a)
            await c.open_session(sim.session_id, sim.config)
            await c.close()
            for _ in range(3):
                await _step_one(target(a), sim, ref)

            async def stored() -> int:
                v = await raw.hget(_key(sim.session_id), "step")
                return -1 if v is None else int(v)

            await wait_until(lambda: _eq(stored(), 3), 10, "A's checkpoint of step 3")
            stale_blob = await raw.hget(_key(sim.session_id), "blob")
            stale_worker = SimSession("contested", seed=9)  # a copy of the worker as it was at step 3
            stale_worker.ws.step, stale_worker.next_pos = sim.ws.step, sim.next_pos
            stale_worker.ws.retained_count, stale_worker.ws.retained_checksum = (sim.ws.retained_count,
                                                                                  sim.ws.retained_checksum)
            stale_worker.retained = [p.clone() for p in sim.retained]

            for _ in range(2):  # the worker moves to B: resume from Redis, then steps 4 and 5
                await _step_one(target(b), sim, ref)
            await wait_until(lambda: _eq(stored(), 5), 10, "B's checkpoint of step 5")
            b_blob, b_delta = await raw.hmget(_key(sim.session_id), "blob", "delta")

            # Stale A must neither answer nor write: B's resume took a newer owner epoch. A's step
            # is refused (ABORTED), A drops its hot copy, and the stored state stays B's.
            a_epoch = a.sessions.hot_sessions()[0].epoch
            stale = stale_worker.make()
            await expect_error(client(a).step([stale.msg]), grpc.StatusCode.ABORTED)
            assert a.sessions.hot_sessions() == []
            async with http(a) as h:
                text = (await h.get("/metrics")).text
                assert sample_value(text, "nexus_sessions_fenced_total", tenant="default") == 1
                assert sample_value(text, "nexus_steps_rejected_total", code="ABORTED") == 1
            assert await stored() == 5 and await raw.hmget(_key(sim.session_id), "blob", "delta") == [b_blob, b_delta]
            with pytest.raises(Fenced):  # a direct write with A's old epoch is fenced too
                await a.store.put("default", sim.session_id, 9, stale_blob, epoch=a_epoch)
            assert await stored() == 5 and await raw.hmget(_key(sim.session_id), "blob", "delta") == [b_blob, b_delta]
            assert load(b_blob, b_delta).checkpoint.state.groups[0].pos.tolist() == sim.retained[0].tolist()
            # The worker, routed to the winner, loses nothing: B goes on with the engine's answers.
            for _ in range(3):
                await _step_one(target(b), sim, ref)
            async with http(b) as h:
                assert sample_value((await h.get("/metrics")).text, "nexus_store_fenced_total") == 0
                assert sample_value((await h.get("/metrics")).text, "nexus_sessions_resumed_total",
                                    tenant="default") == 1
            await raw.aclose()

    arun(body())


async def _eq(value: object, want: object) -> bool:
    return (await value) == want  # type: ignore[misc]


def test_failover_to_an_older_checkpoint_is_detected(redis_server) -> None:
    """checkpoint_every=4: A is SIGKILLed after step 6, so Redis holds step 4. B must refuse the
    worker's step 7 (expected step 5) and a step 5 carrying the worker's post-step-6 cache; the
    worker's replay of steps 5 and 6 gets exactly A's answers."""
    sim = SimSession("fragile", seed=11)
    ref = Reference()
    ref.open(sim)
    sent: dict[int, tuple[Planned, pb.SessionResult]] = {}

    with sidecar_process(*_args(redis_server.url, 4)) as a:
        async def on_a() -> None:
            c = client(a.target)
            await c.open_session(sim.session_id, sim.config)
            await c.close()
            with redis_server.client() as r:
                for _ in range(4):
                    p, res = await _step_one(a.target, sim, ref)
                    sent[res.step] = (p, res)
                await wait_until(lambda: _stored_step(r, sim.session_id) == 4, 10, "the step-4 checkpoint")
                for _ in range(2):
                    p, res = await _step_one(a.target, sim, ref)
                    sent[res.step] = (p, res)
                assert _stored_step(r, sim.session_id) == 4
        arun(on_a())
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=10)

    async def on_b() -> None:
        async with running_sidecar(store=redis_server.url, checkpoint_every=4) as b:
            c = client(b)
            step7 = sim.make()
            msg = await expect_error(c.step([step7.msg]), FP)
            assert "step 7 is out of order" in msg and "expected step 5" in msg, msg
            # Step 5 again, but with the cache the worker holds now (after step 6): mismatch.
            wrong5 = sim.make(step=5)
            msg = await expect_error(c.step([wrong5.msg]), FP)
            assert f"worker holds {sim.ws.retained_count} tokens" in msg, msg
            assert f"sidecar holds {sent[4][1].retained_count}" in msg and "at step 4" in msg, msg
            assert (await c.get_session(sim.session_id)).step == 4, "nothing was applied"
            # The worker rebuilds from step 4 and replays 5 and 6: the same answers as A gave.
            for n in (5, 6):
                p, r_a = sent[n]
                r_b = (await c.step([p.msg]))[0]
                assert r_b.SerializeToString() == r_a.SerializeToString(), f"replayed step {n} differs"
            await drive(c, [sim], 2, ref)  # and continues like the uninterrupted engine
            assert (await c.get_session(sim.session_id)).step == 8
            await c.close()

    arun(on_b())


def test_sigterm_checkpoints_dirty_sessions(redis_server) -> None:
    sims = [SimSession("dirty-a", seed=1), SimSession("dirty-b", seed=2)]
    with sidecar_process(*_args(redis_server.url, 0)) as a:
        async def work() -> None:
            c = client(a.target)
            for s in sims:
                await c.open_session(s.session_id, s.config)
            await drive(c, sims, 3)
            await drive(c, sims[:1], 2)
            await c.close()
        arun(work())
        with redis_server.client() as r:
            # Opening claimed an owner epoch for each session; no state was written.
            assert not [k for k in r.keys("nexus:*") if r.hexists(k, "blob")], \
                "checkpoint_every=0 writes nothing before shutdown"
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(timeout=30) == 0
    with redis_server.client() as r:
        for s, step in zip(sims, (5, 3), strict=True):
            raw = r.hgetall(_key(s.session_id))
            assert int(raw[b"step"]) == step
            cp = load(raw[b"blob"], raw.get(b"delta")).checkpoint
            assert cp.step == step and cp.checksum == s.ws.retained_checksum
            assert cp.state.groups[0].pos.tolist() == s.retained[0].tolist()
            assert 0 < r.pttl(_key(s.session_id)) <= 3600 * 1000, "stored sessions carry the sliding TTL"


def test_resume_on_redis_cluster(redis_cluster) -> None:
    """The same flow on a real 3-node Redis Cluster: checkpoint, stop, resume elsewhere, list
    (SCAN over every primary), close (the key is deleted)."""
    sims = [SimSession(f"c{i}", seed=20 + i) for i in range(4)]
    ref = Reference()
    for s in sims:
        ref.open(s)

    async def body() -> None:
        async with running_sidecar(store=redis_cluster.url, checkpoint_every=2) as a:
            c = client(a)
            for s in sims:
                await c.open_session(s.session_id, s.config)
            await drive(c, sims, 3, ref)
            await c.close()
        async with running_sidecar(store=redis_cluster.url, checkpoint_every=2) as b:
            async with http(b) as h:
                assert (await h.get("/v1/sessions")).json()["sessions"] == [s.session_id for s in sims]
            c = client(b)
            for s in sims:
                assert (await c.open_session(s.session_id, s.config)).step == 3
            await drive(c, sims, 3, ref)
            async with http(b) as h:
                text = (await h.get("/metrics")).text
            assert sample_value(text, "nexus_sessions_resumed_total", tenant="default") == 4
            assert sample_value(text, "nexus_tokens_retained", tenant="default") == \
                sum(s.retained[0].numel() for s in sims), "the retained gauge must count resumed sessions"
            assert await c.close_session("c0") == 6
            await c.close()
            store = RedisStore.from_url(redis_cluster.url)
            try:
                assert await store.get("default", "c0") is None
                assert await store.list("default") == ["c1", "c2", "c3"]
            finally:
                await store.close()
        # The sessions landed on more than one node (the hash tags spread them).
        holders = 0
        for node in redis_cluster.nodes:
            with node.client() as r:
                holders += bool(r.keys("nexus:*"))
        assert holders >= 2

    arun(body())
