"""Delta puts in every store (memory, a real redis-server, a real 3-node Cluster): a delta lands
next to its full blob (same key, so the same Cluster slot), is refused against any other full
blob, never outruns the CAS on the step, and never brings back a closed session."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from nexus_sidecar.server.stores import Fenced, MemoryStore, RedisStore, StateStore, StoredState

StoreFactory = Callable[[], StateStore]


@pytest.fixture(params=["memory", "redis", "cluster"])
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    if request.param == "memory":
        return MemoryStore
    fixture = "redis_server" if request.param == "redis" else "redis_cluster"
    url = request.getfixturevalue(fixture).url
    return lambda: RedisStore.from_url(url, ttl_seconds=60)


def run(factory: StoreFactory, body: Callable[[StateStore], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        store = factory()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def test_delta_lands_next_to_its_full_blob(make_store: StoreFactory) -> None:
    async def body(s: StateStore) -> None:
        assert await s.put("t", "a", 16, b"full16") is True
        assert await s.put("t", "a", 32, b"d32", base=16) is True
        assert await s.get("t", "a") == StoredState(32, b"full16", b"d32")
        assert await s.put("t", "a", 48, b"d48", base=16) is True  # replaces the previous delta
        assert (await s.claim("t", "a"))[1] == StoredState(48, b"full16", b"d48")
        # CAS on the newest step: an older delta or an older full blob arriving late is refused.
        assert await s.put("t", "a", 40, b"late", base=16) is False
        assert await s.put("t", "a", 32, b"latefull") is False
        assert await s.get("t", "a") == StoredState(48, b"full16", b"d48")
        # A full blob drops the delta; deltas against the old full blob are refused from then on.
        assert await s.put("t", "a", 64, b"full64") is True
        assert await s.get("t", "a") == StoredState(64, b"full64")
        assert await s.put("t", "a", 80, b"d80", base=16) is False
        assert await s.get("t", "a") == StoredState(64, b"full64")
        assert await s.put("t", "a", 80, b"d80", base=64) is True
        assert await s.get("t", "a") == StoredState(80, b"full64", b"d80")
        # No full blob at all: a delta alone is never stored.
        assert await s.put("t", "b", 5, b"d5", base=0) is False
        assert await s.get("t", "b") is None

    run(make_store, body)


def test_a_delta_never_resurrects_a_closed_session(make_store: StoreFactory) -> None:
    async def body(s: StateStore) -> None:
        epoch, _ = await s.claim("t", "c")
        assert await s.put("t", "c", 8, b"full8", epoch=epoch) is True
        assert await s.put("t", "c", 9, b"d9", epoch=epoch, base=8) is True
        await s.delete("t", "c")
        assert await s.get("t", "c") is None
        with pytest.raises(Fenced):  # the old owner, late
            await s.put("t", "c", 10, b"d10", epoch=epoch, base=8)
        # Even without an epoch check, a delta needs its full blob, which the tombstone dropped.
        assert await s.put("t", "c", 10, b"d10", base=8) is False
        assert await s.get("t", "c") is None
        assert await s.list("t") == []

    run(make_store, body)


def test_cluster_keeps_full_and_delta_in_the_sessions_slot(redis_cluster: Any) -> None:
    async def body() -> list[str]:
        store = RedisStore.from_url(redis_cluster.url, ttl_seconds=60)
        try:
            for i in range(12):
                assert await store.put("acme", f"s{i}", 1, b"full") is True
                assert await store.put("acme", f"s{i}", 2, f"delta{i}".encode(), base=1) is True
            return [store.key("acme", f"s{i}") for i in range(12)]
        finally:
            await store.close()

    keys = asyncio.run(body())
    # Each session is one hash (full blob, delta, steps, epoch together) on the node owning its slot.
    seen = 0
    for node in redis_cluster.nodes:
        with node.client() as c:
            for i, k in enumerate(keys):
                slot = c.execute_command("CLUSTER", "KEYSLOT", k)
                if c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) and c.exists(k):
                    fields = c.hgetall(k)
                    assert fields[b"blob"] == b"full" and fields[b"delta"] == f"delta{i}".encode()
                    assert fields[b"full"] == b"1" and fields[b"step"] == b"2"
                    assert c.execute_command("CLUSTER", "KEYSLOT", k.replace(":state", ":other")) == slot
                    seen += 1
    assert seen == len(keys)
