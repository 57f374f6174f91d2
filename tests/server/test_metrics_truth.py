"""Metrics that mean what they say (issue 23, defects 2, 3 and 5), against a real redis-server:

- a fenced write is counted as fenced, never as a store error (``observe`` kept "fenced");
- a write retried after a store timeout that meets its own earlier write is ``writer="self"``
  (and counts as written), a newer step in the store is ``writer="other"``;
- an operation cut short by the caller's deadline (``bounded``: the fence check, the readiness
  ping) is ``unavailable`` (and sets degraded), a plain cancellation is ``cancelled``;
- every labelled series a panel rates exists at 0 on the first scrape, before any traffic.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any

import pytest
from nexus_sidecar.server.metrics import STEP_CODES, Metrics
from nexus_sidecar.server.stores import OUTCOMES, Fenced, MemoryStore, RedisStore, StateStore, bounded
from prometheus_client import generate_latest

from tests.server.conftest import KEYS, SimSession, arun, client, drive, http, running_sidecar, sample_value

pytestmark = pytest.mark.timeout(90)


def _value(m: Metrics, name: str, **labels: str) -> float:
    return sample_value(generate_latest(m.registry).decode(), name, **labels)


def _store(kind: str, m: Metrics, redis_server: Any, **kw: Any) -> StateStore:
    if kind == "memory":
        return MemoryStore(on_op=m.on_store_op)
    return RedisStore.from_url(redis_server.url, on_op=m.on_store_op, prefix=f"t{id(m)}", **kw)


def _sleep_redis(rp: Any, seconds: float) -> threading.Thread:
    """``DEBUG SLEEP`` on its own connection: Redis executes nothing else meanwhile (a real stall)."""

    def run() -> None:
        with rp.client() as c:
            c.execute_command("DEBUG", "SLEEP", seconds)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_fenced_write_is_counted_as_fenced_not_as_a_store_error(kind: str, redis_server: Any) -> None:
    m = Metrics()

    async def body() -> None:
        store = _store(kind, m, redis_server)
        old, _ = await store.claim("acme", "s1")
        await store.put("acme", "s1", 1, b"one", epoch=old)
        await store.claim("acme", "s1")  # another replica takes the session over
        with pytest.raises(Fenced):
            await store.put("acme", "s1", 2, b"two", epoch=old)
        await store.delete("acme", "s1")  # closed while a write of the old owner was pending
        with pytest.raises(Fenced):
            await store.put("acme", "s1", 3, b"three", epoch=old)
        await store.close()

    arun(body(), 30)
    assert _value(m, "nexus_store_fenced_total") == 2
    assert _value(m, "nexus_store_errors_total") == 0
    assert _value(m, "nexus_store_operations_total", op="put", outcome="fenced") == 2
    assert _value(m, "nexus_store_operations_total", op="put", outcome="error") == 0
    assert _value(m, "nexus_degraded") == 0


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_own_retry_and_newer_step_are_told_apart(kind: str, redis_server: Any) -> None:
    m = Metrics()

    async def body() -> None:
        store = _store(kind, m, redis_server)
        epoch, _ = await store.claim("acme", "s1")
        assert await store.put("acme", "s1", 5, b"five", epoch=epoch)
        # The same step again under the same epoch: this writer's own write. It is in the store.
        assert await store.put("acme", "s1", 5, b"five", epoch=epoch) is True
        # An older step than the stored one: refused, a real conflict.
        assert await store.put("acme", "s1", 4, b"four", epoch=epoch) is False
        # Without an epoch nobody can tell whose write it was: a conflict.
        assert await store.put("acme", "s1", 5, b"five") is False
        got = await store.get("acme", "s1")
        assert got is not None and (got.step, got.blob) == (5, b"five")
        await store.close()

    arun(body(), 30)
    assert _value(m, "nexus_store_cas_conflicts_total", writer="self") == 1
    assert _value(m, "nexus_store_cas_conflicts_total", writer="other") == 2
    assert _value(m, "nexus_store_operations_total", op="put", outcome="conflict_self") == 1


def test_a_put_retried_after_a_redis_stall_meets_its_own_write(redis_factory) -> None:
    """The issue's case for real: Redis stalls (SIGSTOP) longer than the client's socket
    timeout; redis-py retries the CAS, which Redis had queued and then executed: the retry finds the
    writer's own step. Counted as writer="self" and as written, not as a conflict of two replicas."""
    rp = redis_factory()
    m = Metrics()

    async def body() -> bool:
        store = RedisStore.from_url(rp.url, on_op=m.on_store_op, socket_timeout=0.5, retries=1)
        epoch, _ = await store.claim("acme", "s1")
        await store.put("acme", "s1", 1, b"one", epoch=epoch)  # the script is loaded: one command per put
        os.kill(rp.proc.pid, signal.SIGSTOP)  # Redis stalls: the put's command waits in its socket
        try:
            # The first try times out at 0.5 s and redis-py sends the command again; at 0.8 s Redis runs
            # both, in order: the first writes step 7, the retry finds step 7 under its own epoch.
            asyncio.get_running_loop().call_later(0.8, os.kill, rp.proc.pid, signal.SIGCONT)
            written = await store.put("acme", "s1", 7, b"seven", epoch=epoch)
        finally:
            os.kill(rp.proc.pid, signal.SIGCONT)
        await store.close()
        return written

    assert arun(body(), 30) is True
    assert _value(m, "nexus_store_cas_conflicts_total", writer="self") == 1
    assert _value(m, "nexus_store_cas_conflicts_total", writer="other") == 0
    with rp.client() as c:
        assert c.hget("nexus:{acme:s1}:state", "step") == b"7"


def test_a_store_operation_cut_short_by_a_deadline_is_unavailable(redis_factory) -> None:
    rp = redis_factory("--enable-debug-command", "local")
    m = Metrics()

    async def body() -> None:
        store = RedisStore.from_url(rp.url, on_op=m.on_store_op, socket_timeout=5)
        await store.ping()
        sleeper = _sleep_redis(rp, 0.8)
        await asyncio.sleep(0.1)
        with pytest.raises(TimeoutError):
            async with bounded(0.2):  # what the fence check and the readiness ping do
                await store.epochs("acme", ["s1", "s2"])
        assert _value(m, "nexus_degraded") == 1
        # A caller that goes away for another reason says nothing about the store.
        task = asyncio.create_task(store.ping())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(sleeper.join, 5)
        await store.ping()  # answered: not degraded any more
        await store.close()

    arun(body(), 30)
    assert _value(m, "nexus_store_operations_total", op="epochs", outcome="unavailable") == 1
    assert _value(m, "nexus_store_operations_total", op="epochs", outcome="error") == 0
    assert _value(m, "nexus_store_errors_total", op="epochs") == 1
    assert _value(m, "nexus_store_operations_total", op="ping", outcome="cancelled") == 1
    assert _value(m, "nexus_store_errors_total", op="ping") == 0
    assert _value(m, "nexus_degraded") == 0


def test_the_fence_check_timing_out_on_a_hung_redis_is_unavailable(redis_factory) -> None:
    """End to end: Redis stalls while a Step reads the owner epochs (fence_timeout_s = 0.1 s): the
    step is served from hot state and the epochs read is counted unavailable, not error."""
    rp = redis_factory("--enable-debug-command", "local")

    async def body() -> str:
        async with running_sidecar(store=rp.url, fence_timeout_s=0.1, store_timeout_s=3,
                                   checkpoint_every=0) as sc:
            c = client(sc)
            sim = SimSession("f1")
            await c.open_session(sim.session_id, sim.config)
            await drive(c, [sim], 2)
            sleeper = _sleep_redis(rp, 0.6)
            await asyncio.sleep(0.1)
            await drive(c, [sim], 1)
            await asyncio.to_thread(sleeper.join, 5)
            await c.close()
            async with http(sc) as h:
                return (await h.get("/metrics")).text

    text = arun(body(), 60)
    assert sample_value(text, "nexus_store_operations_total", op="epochs", outcome="unavailable") >= 1
    assert sample_value(text, "nexus_store_operations_total", op="epochs", outcome="error") == 0


def test_every_rated_series_exists_at_zero_on_the_first_scrape(keys_file) -> None:
    """Before any request: every tenant of the keys file x every policy, every session counter per
    tenant, every rpc x code, every store op x outcome, both CAS writers, every background task."""

    async def body() -> str:
        async with running_sidecar(keys_file=keys_file) as sc, http(sc) as h:
            return (await h.get("/metrics")).text

    text = arun(body(), 30)
    series = {(n, tuple(sorted(lab.items()))) for n, lab, _ in _samples(text)}

    def has(name: str, **labels: str) -> bool:
        return (name, tuple(sorted(labels.items()))) in series

    policies = ("nexus", "h2o", "streaming", "snapkv", "tova", "random", "keydiff", "knorm", "nexus_topk")
    for tenant in ("acme", "globex"):
        for policy in policies:
            assert has("nexus_tokens_seen_total", tenant=tenant, policy=policy), (tenant, policy)
            assert has("nexus_tokens_evicted_total", tenant=tenant, policy=policy)
            assert has("nexus_step_retention_ratio_count", tenant=tenant, policy=policy)
            assert has("nexus_evicted_token_age_calls_bucket", tenant=tenant, policy=policy, le="1.0")
        for counter in ("opened", "resumed", "closed", "expired", "resynced", "unloaded", "fenced"):
            assert has(f"nexus_sessions_{counter}_total", tenant=tenant), (counter, tenant)
        for code in STEP_CODES:
            assert has("nexus_steps_rejected_total", tenant=tenant, code=code)
    assert has("nexus_steps_rejected_total", tenant="unauthenticated", code="UNAUTHENTICATED")
    for rpc in ("OpenSession", "Step", "StepBatch", "CloseSession", "GetSession", "Resync", "ListPolicies"):
        assert has("nexus_request_duration_seconds_count", rpc=rpc, code="OK"), rpc
        for code in ("OK", *STEP_CODES):
            assert has("nexus_requests_total", rpc=rpc, code=code), (rpc, code)
    for op, outcomes in OUTCOMES.items():
        assert has("nexus_store_errors_total", op=op)
        for outcome in outcomes:
            assert has("nexus_store_operations_total", op=op, outcome=outcome), (op, outcome)
    assert has("nexus_store_cas_conflicts_total", writer="self") and has("nexus_store_cas_conflicts_total",
                                                                          writer="other")
    for task in ("reaper", "checkpoint", "health"):
        assert has("nexus_maintenance_errors_total", task=task)
    # All of it at 0 (nothing happened yet), and the tenant a client cannot name is not there.
    assert sample_value(text, "nexus_tokens_seen_total") == 0
    assert sample_value(text, "nexus_store_errors_total") == 0
    assert not any(lab.get("tenant") == KEYS["acme"] for _, lab, _ in _samples(text))


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    from tests.server.conftest import metric_samples

    return metric_samples(text)
