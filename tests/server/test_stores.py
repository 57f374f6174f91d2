"""State stores against real backends: in-memory, a real redis-server and a real 3-node Cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from nexus_sidecar.server.stores import (
    InvalidId,
    MemoryStore,
    RedisStore,
    StateStore,
    StoredState,
    StoreError,
    StoreUnavailable,
)
from nexus_sidecar.server.stores.redis_store import load_cas_script

BLOB = bytes(range(256)) * 3  # every byte value: the store must be binary-safe

StoreFactory = Callable[..., StateStore]


@pytest.fixture(params=["memory", "redis", "cluster"])
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    """Build a store of each kind; call it INSIDE the event loop (redis clients bind to it)."""
    kind = request.param
    if kind == "memory":
        return lambda **kw: MemoryStore(**kw)
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        return lambda **kw: RedisStore.from_url(server.url, **kw)
    cluster = request.getfixturevalue("redis_cluster")
    return lambda **kw: RedisStore.from_url(cluster.url, **kw)


def run(factory: StoreFactory, body: Callable[[StateStore], Awaitable[Any]], **kw: Any) -> Any:
    """Run ``body(store)`` in a fresh event loop, closing the store afterwards."""

    async def main() -> Any:
        store = factory(**kw)
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


# --- semantics every store shares ---------------------------------------------------------


def test_round_trip_and_miss(make_store: StoreFactory) -> None:
    async def body(s: StateStore) -> None:
        assert await s.get("t1", "s1") is None
        assert await s.put("t1", "s1", 1, BLOB) is True
        assert await s.get("t1", "s1") == StoredState(step=1, blob=BLOB)
        assert await s.put("t1", "s1", 2, b"") is True  # empty blob is a valid state
        assert await s.get("t1", "s1") == StoredState(step=2, blob=b"")
        await s.ping()
        assert isinstance(s, StateStore)

    run(make_store, body)


@pytest.mark.parametrize("stale", [0, 4, 5])
def test_cas_refuses_stale_writer(make_store: StoreFactory, stale: int) -> None:
    async def body(s: StateStore) -> None:
        assert await s.put("t", "sess", 5, b"newer") is True
        # A stale replica with a lower or equal step must not overwrite newer state.
        assert await s.put("t", "sess", stale, b"stale") is False
        assert await s.get("t", "sess") == StoredState(step=5, blob=b"newer")
        assert await s.put("t", "sess", 6, b"next") is True
        assert await s.get("t", "sess") == StoredState(step=6, blob=b"next")

    run(make_store, body)


def test_cas_exact_above_2_pow_53(make_store: StoreFactory) -> None:
    # Doubles cannot tell 2^53 from 2^53 + 1; the CAS must compare steps exactly.
    big = 2**53

    async def body(s: StateStore) -> None:
        assert await s.put("t", "s", big + 1, b"a") is True
        assert await s.put("t", "s", big, b"b") is False
        assert await s.put("t", "s", big + 1, b"c") is False
        assert await s.put("t", "s", big + 2, b"d") is True
        assert await s.put("t", "s", 10**18, b"e") is True  # more digits, larger
        assert await s.put("t", "s", 9 * 10**17, b"f") is False
        assert await s.get("t", "s") == StoredState(step=10**18, blob=b"e")

    run(make_store, body)


def test_concurrent_writers_exactly_one_wins(make_store: StoreFactory) -> None:
    async def body(s: StateStore) -> None:
        results = await asyncio.gather(*(s.put("t", "race", 7, bytes([i])) for i in range(16)))
        assert sum(results) == 1
        winner = results.index(True)
        assert await s.get("t", "race") == StoredState(step=7, blob=bytes([winner]))

    run(make_store, body)


def test_list_isolates_tenants_and_delete(make_store: StoreFactory) -> None:
    async def body(s: StateStore) -> None:
        for sid in ("b", "a", "c:with:colons"):
            assert await s.put("alpha", sid, 1, b"x")
        assert await s.put("beta", "a", 1, b"y")
        # Glob metacharacters in a tenant must not widen the listing to other tenants.
        assert await s.put("al*", "z", 1, b"w")
        assert await s.list("alpha") == ["a", "b", "c:with:colons"]
        assert await s.list("beta") == ["a"]
        assert await s.list("al*") == ["z"]
        assert await s.list("nobody") == []
        # Same session id in two tenants: two independent states.
        assert (await s.get("beta", "a")) == StoredState(1, b"y")
        await s.delete("alpha", "a")
        await s.delete("alpha", "a")  # idempotent
        assert await s.get("alpha", "a") is None
        assert await s.get("beta", "a") == StoredState(1, b"y")
        assert await s.list("alpha") == ["b", "c:with:colons"]
        # After a delete the session starts over: any step is accepted.
        assert await s.put("alpha", "a", 1, b"again") is True

    run(make_store, body)


@pytest.mark.parametrize(
    ("tenant", "session", "field", "reason"),
    [
        ("", "s", "tenant", "must not be empty"),
        ("t", "", "session_id", "must not be empty"),
        ("t", "a{b", "session_id", "'{' at index 1"),
        ("t", "ab}", "session_id", "'}' at index 2"),
        ("t", "a b", "session_id", "' ' at index 1"),
        ("t", "a\nb", "session_id", "'\\n' at index 1"),
        ("te:n", "s", "tenant", "':' at index 2"),
        ("t\t", "s", "tenant", "'\\t' at index 1"),
        ("t", "x" * 129, "session_id", "129 characters long, the maximum is 128"),
    ],
)
def test_invalid_ids_precise_error(
    make_store: StoreFactory, tenant: str, session: str, field: str, reason: str
) -> None:
    async def body(s: StateStore) -> None:
        for call in (
            lambda: s.get(tenant, session),
            lambda: s.put(tenant, session, 1, b"x"),
            lambda: s.delete(tenant, session),
        ):
            with pytest.raises(InvalidId) as e:
                await call()
            assert e.value.field == field
            assert reason in e.value.reason, e.value.reason

    run(make_store, body)


def test_max_length_id_accepted(make_store: StoreFactory) -> None:
    async def body(s: StateStore) -> None:
        sid = "x" * 128
        assert await s.put("t", sid, 1, b"ok")
        assert await s.list("t") == [sid]

    run(make_store, body)


@pytest.mark.parametrize("step", [-1, 2**63, 1.5, True])
def test_invalid_step_rejected(make_store: StoreFactory, step: Any) -> None:
    async def body(s: StateStore) -> None:
        with pytest.raises(StoreError, match="step"):
            await s.put("t", "s", step, b"x")
        assert await s.get("t", "s") is None

    run(make_store, body)


def test_metrics_hook_sees_outcomes(make_store: StoreFactory) -> None:
    seen: list[tuple[str, str]] = []

    def on_op(op: str, seconds: float, outcome: str) -> None:
        assert seconds >= 0
        seen.append((op, outcome))

    async def body(s: StateStore) -> None:
        await s.get("t", "s")
        await s.put("t", "s", 2, b"x")
        await s.put("t", "s", 1, b"x")
        await s.get("t", "s")
        await s.list("t")
        await s.delete("t", "s")
        await s.ping()

    run(make_store, body, on_op=on_op)
    assert seen == [
        ("get", "miss"),
        ("put", "ok"),
        ("put", "conflict"),
        ("get", "ok"),
        ("list", "ok"),
        ("delete", "ok"),
        ("ping", "ok"),
    ]


def test_failing_metrics_hook_does_not_fail_ops(make_store: StoreFactory) -> None:
    def on_op(op: str, seconds: float, outcome: str) -> None:
        raise RuntimeError("exporter down")

    async def body(s: StateStore) -> None:
        assert await s.put("t", "s", 1, b"x")
        assert await s.get("t", "s") == StoredState(1, b"x")

    run(make_store, body, on_op=on_op)


def test_bad_ttl_rejected(make_store: StoreFactory) -> None:
    with pytest.raises(StoreError, match="ttl_seconds"):
        make_store(ttl_seconds=0)


# --- TTL ----------------------------------------------------------------------------------


def test_memory_ttl_sliding_with_clock() -> None:
    now = [1000.0]
    store = MemoryStore(ttl_seconds=10, clock=lambda: now[0])

    async def body() -> None:
        assert await store.put("t", "s", 1, b"x")
        assert store.ttl_remaining("t", "s") == pytest.approx(10)
        now[0] += 6
        assert store.ttl_remaining("t", "s") == pytest.approx(4)
        assert await store.get("t", "s") is not None  # refresh
        assert store.ttl_remaining("t", "s") == pytest.approx(10)
        now[0] += 6
        assert await store.put("t", "s", 1, b"stale") is False  # refused put still refreshes
        assert store.ttl_remaining("t", "s") == pytest.approx(10)
        now[0] += 10.5
        assert await store.get("t", "s") is None
        assert await store.list("t") == []
        # Once expired, nothing is stored: a new writer starts over at any step.
        assert await store.put("t", "s", 1, b"new")

    asyncio.run(body())


def test_redis_ttl_set_and_refreshed(redis_server: Any) -> None:
    raw = redis_server.client()

    async def body() -> None:
        store = RedisStore.from_url(redis_server.url, ttl_seconds=5)
        key = store.key("t", "s")
        assert await store.put("t", "s", 1, b"x")
        assert 4000 < raw.pttl(key) <= 5000
        # Margins of 500 ms either side keep this stable on a loaded 2-core CI box.
        time.sleep(0.6)
        assert raw.pttl(key) <= 4500
        assert await store.get("t", "s") is not None
        assert raw.pttl(key) > 4500  # get re-armed it
        time.sleep(0.6)
        assert await store.put("t", "s", 1, b"stale") is False
        assert raw.pttl(key) > 4500  # a refused put too
        await store.close()

        # Without TTL a key persists, even if it had one before (PERSIST in the script).
        store = RedisStore.from_url(redis_server.url)
        assert await store.put("t", "s", 2, b"y")
        assert raw.pttl(key) == -1
        await store.close()

    asyncio.run(body())
    raw.close()


def test_redis_ttl_expires(redis_server: Any) -> None:
    async def body() -> None:
        store = RedisStore.from_url(redis_server.url, ttl_seconds=0.2)
        assert await store.put("t", "s", 3, b"x")
        await asyncio.sleep(0.4)
        assert await store.get("t", "s") is None
        assert await store.list("t") == []
        assert await store.put("t", "s", 1, b"fresh")
        await store.close()

    asyncio.run(body())


# --- Redis specifics ----------------------------------------------------------------------


def test_redis_key_layout(redis_server: Any) -> None:
    raw = redis_server.client()

    async def body() -> None:
        store = RedisStore.from_url(redis_server.url)
        assert store.key("acme", "sess-1") == "nexus:{acme:sess-1}:state"
        assert await store.put("acme", "sess-1", 42, b"\x00blob")
        await store.close()

    asyncio.run(body())
    # "full": the step of the full blob, which a delta put must name (see test_store_deltas.py).
    assert raw.hgetall("nexus:{acme:sess-1}:state") == {b"step": b"42", b"blob": b"\x00blob", b"full": b"42"}
    raw.close()


def test_cas_script_is_package_data() -> None:
    src = load_cas_script()
    assert "HSET" in src and "PEXPIRE" in src


def test_cluster_sessions_spread_over_slots_and_nodes(redis_cluster: Any) -> None:
    sessions = [f"s{i}" for i in range(24)]

    async def body() -> None:
        store = RedisStore.from_url(redis_cluster.url, ttl_seconds=30)
        for i, sid in enumerate(sessions):
            assert await store.put("acme", sid, i + 1, f"blob-{i}".encode())
        assert await store.put("other", "s0", 1, b"o")
        for i, sid in enumerate(sessions):
            assert await store.get("acme", sid) == StoredState(i + 1, f"blob-{i}".encode())
            assert await store.put("acme", sid, i + 1, b"stale") is False
        # Listing must gather keys from every primary.
        assert await store.list("acme") == sorted(sessions)
        assert await store.list("other") == ["s0"]
        await store.delete("acme", "s3")
        assert "s3" not in await store.list("acme")
        await store.close()

    asyncio.run(body())
    # The sessions really landed on several slots and on every node (else "cluster" tested nothing).
    first = redis_cluster.nodes[0].client()
    slots = {first.execute_command("CLUSTER", "KEYSLOT", f"nexus:{{acme:{s}}}:state") for s in sessions}
    assert len(slots) > 10
    # The hash tag decides the slot: the key's slot is the slot of "acme:<sid>".
    assert first.execute_command("CLUSTER", "KEYSLOT", "nexus:{acme:s1}:state") == first.execute_command(
        "CLUSTER", "KEYSLOT", "acme:s1"
    )
    first.close()
    per_node = []
    for n in redis_cluster.nodes:
        with n.client() as c:
            per_node.append(c.dbsize())
    assert all(count > 0 for count in per_node), per_node
    assert sum(per_node) == len(sessions) + 1  # s3 stays as its tombstone (an epoch, no state)


def test_redis_unavailable_when_server_down(redis_factory: Any) -> None:
    server = redis_factory()
    outcomes: list[tuple[str, str]] = []

    async def body() -> None:
        store = RedisStore.from_url(server.url, socket_timeout=0.5, on_op=lambda op, s, o: outcomes.append((op, o)))
        assert await store.put("t", "s", 1, b"x")
        server.stop()
        start = time.monotonic()
        for call in (
            lambda: store.get("t", "s"),
            lambda: store.put("t", "s", 2, b"y"),
            lambda: store.delete("t", "s"),
            lambda: store.list("t"),
            store.ping,
        ):
            with pytest.raises(StoreUnavailable, match="unavailable"):
                await call()
        assert time.monotonic() - start < 5  # fails fast, does not stall a step
        await store.close()

    asyncio.run(body())
    assert outcomes[0] == ("put", "ok")
    assert [o for _, o in outcomes[1:]] == ["unavailable"] * 5


def test_redis_unreachable_cluster_is_unavailable() -> None:
    from tests.conftest import free_port

    async def body() -> None:
        store = RedisStore.from_url(f"redis+cluster://127.0.0.1:{free_port()}", socket_timeout=0.3)
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.put("t", "s", 1, b"x")
        await store.close()

    asyncio.run(body())


@pytest.mark.parametrize(
    ("url", "match"),
    [("localhost:6379", "no scheme"), ("http://localhost", "unsupported scheme 'http'")],
)
def test_bad_url(url: str, match: str) -> None:
    with pytest.raises(StoreError, match=match):
        RedisStore.from_url(url)


def test_bad_prefix() -> None:
    async def body() -> None:
        with pytest.raises(StoreError, match="prefix"):
            RedisStore.from_url("redis://127.0.0.1:1", prefix="a{b}")

    asyncio.run(body())


# --- owner epochs and tombstones (server/ownership.py) --------------------------------------------


def test_claim_takes_a_new_epoch_and_fences_the_old_owner(make_store: StoreFactory) -> None:
    from nexus_sidecar.server.stores import Fenced

    async def body(s: StateStore) -> None:
        e1, none = await s.claim("t1", "s1")
        assert none is None and await s.epochs("t1", ["s1", "never"]) == [e1, None]
        assert await s.put("t1", "s1", 3, b"a", epoch=e1) is True
        e2, got = await s.claim("t1", "s1")  # another replica resumes it
        assert e2 == e1 + 1 and got == StoredState(3, b"a")
        with pytest.raises(Fenced):
            await s.put("t1", "s1", 9, b"stale", epoch=e1)  # even a newer step: the writer lost it
        assert await s.get("t1", "s1") == StoredState(3, b"a")
        assert await s.put("t1", "s1", 4, b"b", epoch=e2) is True
        assert await s.epochs("t1", ["s1"]) == [e2]

    run(make_store, body)


def test_delete_leaves_a_tombstone_no_stale_writer_can_get_past(make_store: StoreFactory) -> None:
    from nexus_sidecar.server.stores import Fenced

    async def body(s: StateStore) -> None:
        e1, _ = await s.claim("t1", "s1")
        assert await s.put("t1", "s1", 5, b"x", epoch=e1)
        await s.delete("t1", "s1")
        assert await s.get("t1", "s1") is None and "s1" not in await s.list("t1")
        with pytest.raises(Fenced):  # an old replica's checkpoint cannot resurrect it
            await s.put("t1", "s1", 6, b"old", epoch=e1)
        assert await s.get("t1", "s1") is None
        e3, none = await s.claim("t1", "s1")  # a new session under the same id starts fresh
        assert none is None and e3 > e1 + 1
        assert await s.put("t1", "s1", 1, b"new", epoch=e3)
        assert await s.list("t1") == ["s1"]

    run(make_store, body)


@pytest.mark.parametrize("bad", ["", "a b", "x{y}", "x" * 129, "tab\there"])
def test_validate_ids_names_the_bad_id_as_validate_id_does(bad: str) -> None:
    # The batch check passes good batches whole and, for a bad one, gives validate_id's exact error.
    from nexus_sidecar.server.stores import validate_id, validate_ids

    good = ["s-1", "tenant:s2", "x" * 128]
    assert validate_ids("session_id", good) == good
    with pytest.raises(InvalidId) as want:
        validate_id("session_id", bad)
    with pytest.raises(InvalidId) as got:
        validate_ids("session_id", [*good, bad, "s-9"])
    assert (got.value.field, got.value.reason) == (want.value.field, want.value.reason)
